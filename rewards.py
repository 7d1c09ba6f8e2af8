"""
Rule-based GSM8K rewards for R1-Zero style GRPO: a format reward and an accuracy reward.

    r = format_weight * format + accuracy [+ overlong_weight * overlong]   (reward_components; train.Config)

A completion earns either only if it ended itself (finish_reason "stop": an end-of-sequence token, not the
max_new_tokens cap) and ends with its answer block (nothing but whitespace after its one </answer>). Without that
rule a policy is paid for running on past its answer to the cap: the answer is graded, the junk after it is free.
overlong (off by default): DAPO's soft penalty, 0 until `overlong_buffer` tokens before the cap, then down to -1 at it
(DAPO's weight is 1: a cut completion then costs as much as a right answer earns).
repetition (logged, not paid): the share of a completion's words that repeat a run of words seen earlier in it.

Pure functions of the engine's completion (text and finish reason) and the gold answer; they import nothing
heavier than math-verify (no torch), so the trainer, the evaluator and the tests share them.

How an answer is graded (accuracy_reward):
1. Take the content of the answer block that ends the completion (final_answer). Longer than MAX_ANSWER_CHARS -> 0.
   Text before a final "=" is dropped ("3 * 6 = 18" is graded as "18").
2. Plain text (no operators, no LaTeX commands besides \\boxed, \\text, $, \\( \\)): grade its
   LAST number. "18 or 19" is graded as 19, so hedging earns nothing over committing to the last
   number. Units, "$", "1,080", "18.00" all reduce to the number. No sympy on this path.
3. A lone fraction ("36/2", "\\frac{36}{2}"): exact, also no sympy.
4. Anything else ("3 \\times 6", "\\sqrt{324}") goes to math-verify, which only bounds its time
   with signal.alarm. In math-verify 0.9.0 that raises ValueError off the main thread (even
   with raise_on_error=False), so off the main thread we skip it and grade the last number
   (STATS["mathverify_skipped_thread"]). We also skip it for text outside a small alphabet or with
   more than one "^" (STATS["mathverify_refused"]): alarm cannot interrupt a long C-level bigint.
   A math-verify timeout or error scores 0 and is counted (STATS["timeout"], STATS["parse_error"]).
   Beware: during the call math-verify owns SIGALRM and cancels any alarm the caller had pending.
Numbers longer than MAX_NUM_CHARS (or exponents beyond 1e±100) are refused, never converted;
a gold with no usable number can only be matched by an identical answer text.

Left out: word answers ("eighteen"), units conversion ("1.5 hours" vs gold 90) and partial
credit for near misses; GSM8K golds are plain integers and the prompt asks for just the number.
Non-str input raises TypeError: that is a bug in the caller, not a bad completion.
"""

import re
import threading
from collections import Counter
from fractions import Fraction

from math_verify import parse as mv_parse, verify as mv_verify
from math_verify.errors import TimeoutException
from sympy import Rational

THINK, ANSWER = ("<think>", "</think>"), ("<answer>", "</answer>")  # the tags; the R1 prompts (gsm8k) ask for them
# The default weight of perfect form against a right answer's 1.0 (train.Config.format_weight takes it from here).
# Small: at 0.5 a 0.5B model, which rarely answers right at first, learns the form and drops the reasoning
# (docs/results.md).
FORMAT_WEIGHT = 0.1
MAX_COMPLETION_CHARS = 20_000  # only the tail is searched for answers; the answer comes last anyway
MAX_ANSWER_CHARS = 512    # "just the final number" never needs more; bounds every regex and sympy
MAX_NUM_CHARS = 100       # longer numbers are refused, not converted (str(int) caps at 4300 digits)
MV_TIMEOUT_S = 1          # per math-verify parse / verify call; int because it is signal.alarm
REL_TOL = 1e-6            # answers_equal: relative tolerance, so "18.0000001" votes with "18"

# Why answers were not graded the normal way, counted since import; train.py logs each step's counts
# (metrics.jsonl "rewards/<key>", the progress bar's "flagged"). Not locked: counts are approximate if several
# threads grade at once.
STAT_KEYS = ("timeout", "parse_error", "mathverify_skipped_thread", "mathverify_refused", "number_too_long",
             "answer_too_long", "gold_no_number")
STATS = Counter()

_NUM = re.compile(r"(?:(?<![\w.])-)?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_THOUSANDS = re.compile(r"(?<=[0-9])(?:,|\{,\}|\\,)(?=[0-9]{3}(?![0-9]))")
_WRAPPERS = re.compile(r"\\(?:boxed|fbox|mbox|text[a-z]*|math[a-z]*)\b|\\[$%,;:!()\[\] ]|\$|%")
_OPS = re.compile(r"[+*/^×÷!\\]|[0-9]\s*-\s*[0-9]")
_FRACTION = re.compile(r"[\s{(]*(-?)\s*(?:\\[dt]?frac\s*\{\s*([0-9]{1,100})\s*\}\s*\{\s*([0-9]{1,100})\s*\}"
                       r"|([0-9]{1,100})\s*/\s*([0-9]{1,100}))[\s})]*")
_WORDS = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]+")  # unit words, not \commands
_MV_ALPHABET = re.compile(r"(?:[0-9\s.+\-*/^(){}\[\]]|\\[dt]?frac|\\sqrt|\\times|\\cdot|\\div|\\left|\\right)*")


def _check_str(*xs):
    for x in xs:
        if not isinstance(x, str):
            raise TypeError(f"rewards expects str, got {type(x).__name__}")  # no repr: it may be huge


def _to_fraction(token):
    """Number token -> Fraction, or None when it is too big to convert safely."""
    mantissa, _, exp = token.lower().partition("e")
    if len(mantissa) > MAX_NUM_CHARS or len(exp) > 4 or (exp and abs(int(exp)) > 100):
        STATS["number_too_long"] += 1
        return None
    return Fraction(token)


def _canon(x):
    """Fraction -> canonical string: Fraction(1080) -> "1080", Fraction(9, 2) -> "4.5", 1/3 -> "1/3"."""
    if x.denominator == 1:
        return str(x.numerator)
    for k in range(1, 2 * MAX_NUM_CHARS):  # terminating decimal? then print it exactly
        if (10**k) % x.denominator == 0:
            digits = str(abs(x.numerator) * (10**k // x.denominator)).rjust(k + 1, "0")
            return ("-" if x < 0 else "") + digits[:-k] + "." + digits[-k:]
    return f"{x.numerator}/{x.denominator}"


def _last_number(text):
    """Last number in text as a Fraction: "$1,080 (18 dozen)" -> 18. None if none or too big."""
    text = _THOUSANDS.sub("", text.replace("−", "-"))
    last = None
    for last in _NUM.finditer(text):
        pass
    return None if last is None else _to_fraction(last.group())


def _value(text):
    """A lone fraction ("36/2", "\\frac{36}{2}") exactly, else the last number: "1/3" -> 1/3, "18 or 19" -> 19."""
    m = _FRACTION.fullmatch(text)
    if not m:
        return _last_number(text)
    sign, num, den = m.group(1), m.group(2) or m.group(4), m.group(3) or m.group(5)
    return Fraction(int(num), int(den)) * (-1 if sign else 1) if int(den) else None


def _gold_value(gold):
    """GSM8K answer field -> (text after the last "####", its value or None)."""
    tail = gold[-MAX_COMPLETION_CHARS:].rpartition("####")[2][-MAX_ANSWER_CHARS:].strip()
    x = _value(tail)
    if x is None:
        STATS["gold_no_number"] += 1
    return tail, x


def _close(a, b):
    return abs(a - b) <= Fraction(REL_TOL) * max(abs(a), abs(b))


def final_answer(completion: str) -> str | None:
    """Content (stripped) of the answer block that ends the completion, or None: the completion's one </answer>
    must be followed by nothing but whitespace.

    "<think>..</think><answer> 18 </answer>\n" -> "18";  "<answer>18</answer> junk" -> None (text after it);
    "<answer>17</answer><answer>18</answer>" -> None (a second block is text after the first: no hedging);
    "<answer><answer>1</answer>" -> "1": the innermost opening tag before the closing one wins.
    """
    _check_str(completion)
    (open_, close), text = ANSWER, completion[-MAX_COMPLETION_CHARS:]
    end = text.find(close)
    start = text.rfind(open_, 0, max(end, 0))
    if end < 0 or start < 0 or text[end + len(close):].strip():
        return None
    return text[start + len(open_):end].strip()


def format_reward(completion: str) -> float:
    """1.0 for exactly [<think>] ... </think> <answer> X </answer> (whitespace around and between,
    one of each tag, X holding a number). The opening <think> may be missing because the trainer may put
    it in the prompt; then the completion starts inside the think block. 0.5 when the completion ends with a
    gradable answer block (final_answer holds a number) but the rest is off: a broken think part, text before
    <think> or between the blocks. 0.0 otherwise, text after </answer> included. Of the text alone: a completion
    cut at the length cap earns nothing whatever its text (reward_components).

    Why the number: GSM8K answers are numbers, and the system prompt shows the tags with placeholder text.
    SmolLM2-135M, paid for the bare layout, learned within 50 steps to answer every question with the
    prompt's own example "<think> reasoning process here </think><answer> answer here </answer>"
    (docs/results.md); such an answer earns no format credit.
    """
    answer = final_answer(completion)
    if not answer or _last_number(answer[-MAX_ANSWER_CHARS:]) is None:
        return 0.0
    s, (think, think_end), answer_tag = completion.strip(), THINK, ANSWER[0]
    if s.count(think) > 1 or (s.count(think) == 1 and not s.startswith(think)):
        return 0.5
    if s.count(think_end) != 1 or s.count(answer_tag) != 1:
        return 0.5
    return 1.0 if s.split(think_end, 1)[1].strip().startswith(answer_tag) else 0.5


def parse_gold(gold: str) -> str:
    """GSM8K answer field or bare number -> canonical number string.

    "Natalia sold ...\\n#### 1,080" -> "1080";  "-3" -> "-3";  "18.50" -> "18.5".
    No usable number -> the stripped text (counted as "gold_no_number"), which matches no number.
    """
    _check_str(gold)
    tail, x = _gold_value(gold)
    return tail if x is None else _canon(x)


def lenient_answer(completion: str) -> str | None:
    """Last number anywhere in the completion (tags or not), canonicalised; for lenient pass@1."""
    _check_str(completion)
    x = _last_number(completion[-MAX_COMPLETION_CHARS:])
    return None if x is None else _canon(x)


def answers_equal(pred: str, gold: str) -> bool:
    """Numeric equality within REL_TOL when both are numbers, else exact stripped-string equality.
    Used by majority vote, so it must be cheap: no sympy."""
    _check_str(pred, gold)
    a, b = _value(pred[-MAX_ANSWER_CHARS:]), _value(gold[-MAX_ANSWER_CHARS:])
    if a is None or b is None:
        return pred.strip() == gold.strip()
    return _close(a, b)


def _mathverify_equal(text, gold):
    """math-verify on the main thread only; timeouts and errors score False and are counted."""
    if threading.current_thread() is not threading.main_thread():
        STATS["mathverify_skipped_thread"] += 1  # signal.alarm is main-thread only
        return None
    if text.count("^") > 1 or not _MV_ALPHABET.fullmatch(text):
        STATS["mathverify_refused"] += 1  # nested powers etc.: alarm can't stop C-level bigint work
        return None
    try:
        pred = mv_parse(f"${text}$", parsing_timeout=MV_TIMEOUT_S, raise_on_error=True)
        if not pred:
            STATS["parse_error"] += 1
            return False
        gold_expr = Rational(gold.numerator, gold.denominator)
        return mv_verify(gold_expr, pred, timeout_seconds=MV_TIMEOUT_S, raise_on_error=True)
    except TimeoutException:  # a BaseException in math-verify, so it needs its own clause
        STATS["timeout"] += 1
        return False
    except Exception:  # sympy / latex2sympy raise anything on hostile text; count, don't hide
        STATS["parse_error"] += 1
        return False


def accuracy_reward(completion: str, gold: str) -> float:
    """1.0 if the answer block that ends the completion equals the gold number (rules in the module docstring),
    else 0.0. Of the text alone: a completion cut at the length cap earns nothing whatever its text
    (reward_components)."""
    _check_str(completion, gold)
    answer = final_answer(completion)
    if not answer:
        return 0.0
    if len(answer) > MAX_ANSWER_CHARS:
        STATS["answer_too_long"] += 1
        return 0.0
    gold_text, gold_x = _gold_value(gold)
    if gold_x is None:  # a gold that is not a number can only match as text
        return float(answer == gold_text)
    text = _WRAPPERS.sub(" ", _THOUSANDS.sub("", answer)).rpartition("=")[2]
    if _OPS.search(text):  # drop unit words and separators; try the exact fraction, then math-verify
        text = _WORDS.sub(" ", text).replace("×", "\\times ").replace("÷", "\\div ")
        if not _FRACTION.fullmatch(text):
            ok = _mathverify_equal(text.strip(), gold_x)
            if ok is not None:
                return float(ok)
    x = _value(text)  # plain text, a lone fraction, or math-verify skipped: no sympy
    return float(x is not None and _close(x, gold_x))


def overlong_penalty(num_tokens: int, max_new_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_new_tokens - buffer tokens, then linearly down to -1 at the cap.
    overlong_penalty(290, 300, 20) -> -0.5; buffer 0 -> always 0 (off)."""
    if buffer <= 0:
        return 0.0
    return max(-1.0, min(0.0, (max_new_tokens - buffer - num_tokens) / buffer))


def repetition(text: str, n: int = 8) -> float:
    """The share of a text's words that close a run of n words already seen earlier in it: near 0 for reasoning, high
    for a completion caught in a loop (the same sentence again and again), which a policy can drift into while it
    still stops in time and is paid. A diagnostic the trainer and the evaluator log, not a reward term.
    repetition("a b c a b c a b c", n=3) -> 4/9: of its 7 runs of 3 words, the last 4 were seen before."""
    words = text.split()
    seen, repeated = set(), 0
    for i in range(n, len(words) + 1):
        run = tuple(words[i - n:i])
        repeated += run in seen
        seen.add(run)
    return repeated / max(len(words), 1)


def reward_components(completion, gold: str, format_weight: float = FORMAT_WEIGHT, max_new_tokens: int = 0,
                      overlong_buffer: int = 0, overlong_weight: float = 1.0) -> dict[str, float]:
    """The engine's completion (a dict with "text" and "finish_reason", plus "token_ids" for overlong_buffer) ->
    {"format", "accuracy", "reward"} (and "overlong", unweighted, when overlong_buffer > 0); the trainer optimises
    "reward" and logs every component. A completion cut at the cap (finish_reason "length") earns no format and no
    accuracy. format_weight must stay below 1, so that a right answer is always worth more than perfect form."""
    if isinstance(completion, str):
        raise TypeError("reward_components takes the engine's completion (a dict with text and finish_reason), not its "
                        "text: whether it stopped or was cut at the cap decides its reward")
    if not 0 <= format_weight < 1:
        raise ValueError(f"format_weight={format_weight} must be in [0, 1): a right answer (1) must beat perfect form")
    text, stopped = completion["text"], completion["finish_reason"] == "stop"
    fmt = format_reward(text) if stopped else 0.0
    acc = accuracy_reward(text, gold) if stopped else 0.0
    out = {"format": fmt, "accuracy": acc, "reward": format_weight * fmt + acc}
    if overlong_buffer > 0:
        out["overlong"] = overlong_penalty(len(completion["token_ids"]), max_new_tokens, overlong_buffer)
        out["reward"] += overlong_weight * out["overlong"]
    return out

