"""Tests for rewards.py: grading rules, format rules, and hostile text (CPU, seconds)."""
import os
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402
from math_verify.errors import TimeoutException  # noqa: E402


def wrap(answer, think="reasoning"):
    return f"<think>{think}</think><answer>{answer}</answer>"


def in_thread(fn, *args):
    """Run fn off the main thread; return its result (re-raising its exception)."""
    box = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # hand it back to the test
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"{fn.__name__} did not return off the main thread"
    if "error" in box:
        raise box["error"]
    return box["result"]


# ----------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("answer, gold, expected", [
    ("18", "18", 1.0),
    ("17", "18", 0.0),
    ("18", "Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", 1.0),
    ("1080", "#### 1,080", 1.0),
    ("1,080", "1080", 1.0),
    ("1,080", "#### 1,080", 1.0),
    ("1{,}080", "1080", 1.0),
    (r"\boxed{18}", "18", 1.0),
    (r"\boxed{\$18}", "18", 1.0),
    (r"\boxed{17}", "18", 0.0),
    (r"\frac{36}{2}", "18", 1.0),
    (r"\dfrac{36}{2}", "18", 1.0),
    (r"\boxed{\frac{36}{2}}", "18", 1.0),
    ("36/2", "18", 1.0),
    ("36/3", "18", 0.0),
    ("$18", "18", 1.0),
    ("$18$", "18", 1.0),
    (r"\(18\)", "18", 1.0),
    ("18 dollars", "18", 1.0),
    ("18 eggs", "18", 1.0),
    (r"\text{18 eggs}", "18", 1.0),
    ("18.00", "18", 1.0),
    ("18.5", "18", 0.0),
    ("-3", "-3", 1.0),
    ("-3", "3", 0.0),
    (r"-\frac{6}{2}", "-3", 1.0),
    ("50%", "50", 1.0),
    ("x = 18", "18", 1.0),
    ("3 * 6 = 18 eggs", "18", 1.0),
    (r"3 \times 6", "18", 1.0),
    (r"\sqrt{324}", "18", 1.0),
    ("2^{10}", "1024", 1.0),
    ("18 or 19", "18", 0.0),
    ("18 or 19", "19", 1.0),
    ("between 17 and 18", "17", 0.0),
    ("eighteen", "18", 0.0),
    ("", "18", 0.0),
])
def test_accuracy_reward(answer, gold, expected):
    """The answer block that ends the completion is graded by value against the gold number (last-number rule for
    text)."""
    assert rewards.accuracy_reward(wrap(answer), gold) == expected


def test_answer_outside_tags_only_counts_leniently():
    """A number outside <answer> tags earns no accuracy but is what lenient_answer reads."""
    completion = "<think>6 * 3 = 18</think> The answer is 18."
    assert rewards.accuracy_reward(completion, "18") == 0.0
    assert rewards.lenient_answer(completion) == "18"


@pytest.mark.parametrize("completion, expected", [
    ("<think>x</think><answer> 18 </answer>", "18"),
    ("<think>x</think><answer>18</answer>\n  ", "18"),  # whitespace after the block is fine
    ("<think>x</think><answer>18</answer> hope that helps", None),  # text after it
    ("<think>x</think><answer>18</answer>}}</td></html></html>", None),  # the junk a policy learned to append
    ("<think>x</think><answer>17</answer> wait <answer>18</answer>", None),  # two blocks: no hedging
    ("<think>x</think><answer>17</answer><answer>18</answer>", None),
    ("<answer><answer>1</answer>", "1"),  # the innermost opening tag before the closing one
    ("<think>x</think><answer>18", None),  # unclosed
    ("18", None),
])
def test_final_answer_is_the_block_that_ends_the_completion(completion, expected):
    """Only an answer block that ends the completion is read; text after it, a second block included, voids it."""
    assert rewards.final_answer(completion) == expected
    assert rewards.accuracy_reward(completion, "18") == float(expected == "18")


@pytest.mark.parametrize("gold, canon", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,080", "1080"),
    ("#### 72", "72"),
    ("1080", "1080"),
    ("1,080", "1080"),
    ("-3", "-3"),
    ("18.50", "18.5"),
    ("1/3", "1/3"),
    (" 18 \n", "18"),
])
def test_parse_gold(gold, canon):
    """parse_gold reduces a GSM8K answer field or a bare number to one canonical string."""
    assert rewards.parse_gold(gold) == canon


@pytest.mark.parametrize("completion, expected", [
    ("so 18 dollars.", "18"),
    ("<answer>1,080</answer>", "1080"),
    ("it drops to -3 degrees", "-3"),
    ("no digits here", None),
    ("", None),
])
def test_lenient_answer(completion, expected):
    """lenient_answer is the last number anywhere, canonicalised like parse_gold."""
    assert rewards.lenient_answer(completion) == expected


@pytest.mark.parametrize("a, b, expected", [
    ("18", "18.0", True),
    ("18.0000001", "18", True),
    ("18.001", "18", False),
    ("1080", "1,080", True),
    ("1/3", "0.3333333333", True),
    ("abc", "abc", True),
    ("abc", "18", False),
])
def test_answers_equal(a, b, expected):
    """answers_equal compares numbers with 1e-6 relative tolerance, else exact text."""
    assert rewards.answers_equal(a, b) is expected


# ----------------------------------------------------------------------------- format

@pytest.mark.parametrize("completion, expected", [
    ("<think>6*3=18</think><answer>18</answer>", 1.0),
    ("\n <think>\n6*3=18\n</think>\n\n<answer>\n18\n</answer>\n", 1.0),
    ("6*3=18</think><answer>18</answer>", 1.0),  # trainer put <think> in the prompt
    ("<think>6*3=18<answer>18</answer>", 0.5),  # missing </think>
    ("<answer>18</answer>", 0.5),  # no think part at all
    ("<think>a</think><answer>17</answer><answer>18</answer>", 0.0),  # two answer blocks: text after the first
    ("<think>a</think><answer>18</answer> hope that helps", 0.0),  # trailing text
    ("<think>a</think><answer>18</answer>}}</body></html>", 0.0),  # trailing junk
    ("<think>a</think><answer>18</answer>\n\n", 1.0),  # trailing whitespace
    ("<think>a<answer>17</answer></think><answer>18</answer>", 0.0),  # an answer inside the think part
    ("hi <think>a</think><answer>18</answer>", 0.5),  # text before <think>
    ("<think>a</think><think>b</think><answer>18</answer>", 0.5),  # two think blocks
    ("<think>a</think> so <answer>18</answer>", 0.5),  # text between the blocks
    ("<think>a</think><answer> </answer>", 0.0),  # empty answer
    ("<think>a</think><answer>eighteen</answer>", 0.0),  # no number: not gradable
    # regression (a SmolLM2 run): the policy copied the system prompt's example for full format credit
    (" reasoning process here </think><answer> answer here </answer>", 0.0),
    ("<think>a</think><answer>\\frac{36}{2}</answer>", 1.0),  # any number-bearing answer counts
    ("<think>a</think>", 0.0),  # no answer
    ("<think>a</think><answer>18", 0.0),  # unclosed answer
    ("", 0.0),
])
def test_format_reward(completion, expected):
    """1.0 for the exact think/answer layout around a number, 0.5 for a gradable answer that ends the completion in a
    broken layout, else 0."""
    assert rewards.format_reward(completion) == expected


def done(text, finish_reason="stop", n_tokens=10):
    """A completion as an engine returns it."""
    return {"text": text, "finish_reason": finish_reason, "token_ids": [7] * n_tokens, "logprobs": [-1.0] * n_tokens}


@pytest.mark.parametrize("completion, fmt, acc", [
    (done("<think>6*3=18</think><answer>18</answer>"), 1.0, 1.0),  # a clean answer
    (done("<think>6*3=18</think><answer>18</answer>", "length"), 0.0, 0.0),  # cut at the cap: nothing
    (done("<think>6*3=18</think><answer>18</answer> 18}}</td></html></html></html>", "length"), 0.0, 0.0),
    (done("<think>6*3=18</think><answer>18</answer>}}</td></html>"), 0.0, 0.0),  # junk after the answer
    (done("<think>a</think><answer>17</answer><answer>18</answer>"), 0.0, 0.0),  # two answer blocks
    (done("<answer>18</answer>"), 0.5, 1.0),  # right, ends with its answer, no think part: half the form
    (done("<think>a</think><answer>17</answer>"), 1.0, 0.0),
])
def test_reward_components_read_the_whole_completion(completion, fmt, acc):
    """A completion earns format and accuracy only if it stopped by itself and ends with its answer block."""
    c = rewards.reward_components(completion, "#### 18")
    assert c == {"format": fmt, "accuracy": acc, "reward": rewards.FORMAT_WEIGHT * fmt + acc}


def test_reward_components():
    """reward = format_weight * format + accuracy (default rewards.FORMAT_WEIGHT), and accuracy dominates format;
    a weight of 1 or more, which would pay perfect form as much as a right answer, is refused; the completion's text
    alone is refused too (whether it stopped decides its reward)."""
    half = rewards.reward_components(done("<think>a</think><answer>17</answer>"), "18", format_weight=0.5)
    assert half["reward"] == 0.5
    wrong = rewards.reward_components(done("<think>a</think><answer>17</answer>"), "18", 0.99)["reward"]
    right_messy = rewards.reward_components(done("<answer>18</answer>"), "18", 0.99)["reward"]
    assert right_messy > wrong, (right_messy, wrong)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="format_weight"):
            rewards.reward_components(done("<answer>18</answer>"), "18", bad)
    with pytest.raises(TypeError, match="finish_reason"):
        rewards.reward_components("<think>a</think><answer>18</answer>", "18")


@pytest.mark.parametrize("n_tokens, penalty", [(0, 0.0), (280, 0.0), (290, -0.5), (299, -0.95), (300, -1.0)])
def test_overlong_penalty(n_tokens, penalty):
    """DAPO's soft overlong penalty: 0 until the last overlong_buffer tokens before the cap, then linear down to -1;
    it adds to the reward, times overlong_weight, and is logged unweighted as its own component. Buffer 0: off, no
    component."""
    assert rewards.overlong_penalty(n_tokens, 300, 20) == pytest.approx(penalty)
    c = rewards.reward_components(done("<think>a</think><answer>18</answer>", n_tokens=n_tokens), "18",
                                  max_new_tokens=300, overlong_buffer=20)
    assert c["overlong"] == pytest.approx(penalty) and c["reward"] == pytest.approx(1.1 + penalty)
    assert "overlong" not in rewards.reward_components(done("<answer>18</answer>", n_tokens=n_tokens), "18")
    light = rewards.reward_components(done("<think>a</think><answer>18</answer>", n_tokens=n_tokens), "18",
                                      max_new_tokens=300, overlong_buffer=20, overlong_weight=0.1)
    assert light["overlong"] == pytest.approx(penalty) and light["reward"] == pytest.approx(1.1 + 0.1 * penalty)


def test_repetition_tells_a_loop_from_reasoning():
    """The share of words that repeat an earlier run of 8 words: 0 for reasoning that restates no sentence; most of a
    completion that repeats its last sentence, as the recipe's collapsed policy wrote them."""
    reasoning = ("She has 16 eggs and eats 3, so 16 - 3 = 13 are left. She sells 13 eggs at $2 each, so she makes "
                 "13 * 2 = 26 dollars. ")
    loop = reasoning + "Thus the answer is \\(\\boxed{26}\\). " * 12
    assert rewards.repetition(reasoning) == 0.0 and rewards.repetition("") == 0.0
    # 91 words; the loop's 60 all repeat, but for the 7 whose run reaches back into the reasoning and the first run
    # at each of the 5-word sentence's 5 offsets
    assert rewards.repetition(loop) == pytest.approx((60 - 7 - 5) / 91)
    assert rewards.repetition("a b c a b c a b c", n=3) == pytest.approx(4 / 9)


def test_every_counted_reason_is_logged():
    """Each reason rewards.py counts in STATS is one of STAT_KEYS, which train.py logs every step (rewards/<key>)."""
    import inspect
    import re
    assert set(re.findall(r'STATS\["(\w+)"\]', inspect.getsource(rewards))) == set(rewards.STAT_KEYS)


def test_r1_prompts_name_the_tags_and_the_example_earns_full_credit():
    """The R1 system prompts ask for the exact tags format_reward checks; r1_example's worked example, as the
    model would write it after the prefilled <think>, is itself a full-credit completion (format 1, right answer)."""
    import gsm8k
    for name in ("r1", "r1_example", "r1_turn"):
        for tag in ("<think>", "</think>", "<answer>", "</answer>"):
            assert tag in gsm8k.PROMPTS[name].system, (name, tag)
    assert gsm8k.EXAMPLE.endswith(gsm8k.EXAMPLE_REPLY) and gsm8k.PROMPTS["r1_turn"].example[1] == gsm8k.EXAMPLE_REPLY
    assert [p.tagged for p in gsm8k.PROMPTS.values()] == [p.start == rewards.THINK[0] for p in gsm8k.PROMPTS.values()]
    reply = gsm8k.EXAMPLE_REPLY.removeprefix("<think>")
    assert rewards.format_reward(reply) == 1.0 and rewards.accuracy_reward(reply, "#### 40") == 1.0, reply


@pytest.mark.parametrize("fn, args", [
    (rewards.format_reward, (None,)),
    (rewards.accuracy_reward, (b"<answer>18</answer>", "18")),
    (rewards.accuracy_reward, ("<answer>18</answer>", 18)),
    (rewards.parse_gold, (10**5000,)),
    (rewards.answers_equal, ("18", None)),
])
def test_non_str_is_a_type_error(fn, args):
    """Non-str input is a caller bug: TypeError, not a silent 0."""
    with pytest.raises(TypeError):
        fn(*args)


# ----------------------------------------------------------------------------- math-verify boundary

def test_off_main_thread_skips_mathverify_and_counts():
    """Off the main thread math-verify is skipped (its signal.alarm raises there), counted, and the
    last number is graded; lone fractions stay exact."""
    before = rewards.STATS["mathverify_skipped_thread"]
    assert rewards.accuracy_reward(wrap(r"3 \times 6"), "18") == 1.0  # main thread: math-verify
    assert in_thread(rewards.accuracy_reward, wrap(r"3 \times 6"), "18") == 0.0  # graded as 6
    assert in_thread(rewards.accuracy_reward, wrap(r"3 \times 6"), "6") == 1.0
    assert rewards.STATS["mathverify_skipped_thread"] == before + 2
    assert in_thread(rewards.accuracy_reward, wrap(r"\frac{36}{2}"), "18") == 1.0
    assert in_thread(rewards.accuracy_reward, wrap("1,080 dollars"), "#### 1,080") == 1.0


def test_nested_powers_are_refused_and_counted():
    """Nested powers never reach sympy (alarm cannot stop C bigint work); they are counted."""
    before = rewards.STATS["mathverify_refused"]
    assert rewards.accuracy_reward(wrap("9^{9^{9^{9^{9}}}}"), "18") == 0.0
    assert rewards.STATS["mathverify_refused"] == before + 1


@pytest.mark.parametrize("exc, key", [(TimeoutException("slow"), "timeout"),
                                      (RuntimeError("bad latex"), "parse_error")])
def test_mathverify_failures_are_counted(monkeypatch, exc, key):
    """A math-verify timeout or error scores 0 and increments its STATS key instead of vanishing."""
    def boom(*args, **kwargs):
        raise exc
    monkeypatch.setattr(rewards, "mv_parse", boom)
    before = rewards.STATS[key]
    assert rewards.accuracy_reward(wrap(r"\sqrt{324}"), "18") == 0.0
    assert rewards.STATS[key] == before + 1


def test_real_timeout_is_counted():
    """A real math-verify timeout returns 0 and counts "timeout" (verifying 50 nested fractions
    against 18 runs > 10 s without the alarm)."""
    before = rewards.STATS["timeout"]
    t0 = time.perf_counter()
    assert rewards.accuracy_reward(HOSTILE["frac nesting under cap"], "18") == 0.0
    assert rewards.STATS["timeout"] == before + 1, dict(rewards.STATS)
    assert time.perf_counter() - t0 < BOUND_S


def test_bug_in_our_code_is_not_swallowed(monkeypatch):
    """A TypeError inside our own grading code propagates; only math-verify calls are guarded."""
    def buggy(text):
        raise TypeError("bug")
    monkeypatch.setattr(rewards, "_last_number", buggy)
    with pytest.raises(TypeError, match="bug"):
        rewards.accuracy_reward(wrap("18"), "18")


@pytest.mark.slow
def test_import_is_light():
    """rewards imports no torch, so evaluation and tests can use it alone."""
    code = "import rewards, sys; assert 'torch' not in sys.modules, 'torch imported'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)


# ----------------------------------------------------------------------------- hostile text

DIGITS_10MB = "9" * 10_000_000
HOSTILE = {
    "10MB digits": DIGITS_10MB,
    "10MB digits in answer": f"<think>x</think><answer>{DIGITS_10MB}</answer>",
    "1MB frac nesting": "\\frac{" * 170_000,
    "1MB frac nesting in answer": "<answer>" + "\\frac{1}{" * 110_000 + "</answer>",
    "frac nesting under cap": "<answer>" + "\\frac{1}{" * 50 + "2" + "}" * 50 + "</answer>",
    "power tower 9": "<answer>9^{9^{9^{9^{9}}}}</answer>",
    "power tower 10": "<answer>10^{10^{10^{100}}}</answer>",
    "deep sqrt": "<answer>" + "\\sqrt{" * 10_000 + "4" + "}" * 10_000 + "</answer>",
    "sqrt nesting under cap": "<answer>" + "\\sqrt{" * 60 + "4" + "}" * 60 + "</answer>",
    "nested answer tags": "<answer><answer>1</answer>",
    "reversed tags": "</answer> 1 <answer>",
    "double close": "<think></think><answer>1</answer></answer>",
    "many tags": "<answer>" * 100_000 + "</answer>" * 100_000,
    "control chars and NUL": "\x00\x01<think>\x07</think><answer>\x00 18 \x1b</answer>\x00",
    "lone surrogate": "\ud800",
    "surrogate in answer": "<answer>\ud800 1+\ud800</answer>",
    "10k-digit number": "<answer>" + "7" * 10_000 + "</answer>",
    "300-digit number": "<answer>" + "7" * 300 + "</answer>",
    "300-digit product": "<answer>" + "7" * 300 + "*2</answer>",
    "nan": "<answer>nan</answer>",
    "inf": "<answer>-inf</answer>",
    "1e999999": "<answer>1e999999</answer>",
    "1e999999 times": "<answer>1e999999 * 2</answer>",
    "factorial": "<answer>(10^{99})!</answer>",
    "empty": "",
}
BOUND_S = 10.0  # "it returns at all", not a performance threshold


def check_all(text):
    """Call every public function on text (as completion and as gold); check types and ranges."""
    t0 = time.perf_counter()
    assert rewards.format_reward(text) in (0.0, 0.5, 1.0)
    assert rewards.accuracy_reward(text, "18") in (0.0, 1.0)
    assert rewards.accuracy_reward("<answer>18</answer>", text) in (0.0, 1.0)
    assert isinstance(rewards.parse_gold(text), str)
    assert rewards.final_answer(text) is None or isinstance(rewards.final_answer(text), str)
    assert rewards.lenient_answer(text) is None or isinstance(rewards.lenient_answer(text), str)
    assert isinstance(rewards.answers_equal(text, "18"), bool)
    c = rewards.reward_components(done(text), "#### 18")
    assert 0.0 <= c["reward"] <= 1.0 + rewards.FORMAT_WEIGHT, c
    return time.perf_counter() - t0


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_text_main_thread(name):
    """No str input makes a public function raise or hang (main thread, math-verify active)."""
    dt = check_all(HOSTILE[name])
    assert dt < BOUND_S, f"{name}: {dt:.1f} s"


@pytest.mark.parametrize("name", ["10MB digits", "10MB digits in answer", "power tower 9", "power tower 10",
                                  "1MB frac nesting in answer", "sqrt nesting under cap", "surrogate in answer"])
def test_hostile_text_other_thread(name):
    """The same holds off the main thread, where math-verify's alarm-based timeout cannot run."""
    dt = in_thread(check_all, HOSTILE[name])
    assert dt < BOUND_S, f"{name}: {dt:.1f} s"


def test_huge_numbers_are_refused_not_converted():
    """Numbers beyond MAX_NUM_CHARS digits or 1e+-100 are never int()-ed: counted, then compared as text."""
    before = rewards.STATS["number_too_long"]
    big = "7" * 300
    assert rewards.accuracy_reward(f"<answer>{big}</answer>", big) == 1.0  # identical text
    assert rewards.accuracy_reward(f"<answer>{big}</answer>", big + "8") == 0.0
    assert rewards.accuracy_reward(f"<answer>{big}</answer>", "18") == 0.0
    assert rewards.lenient_answer("1e999999") is None
    assert rewards.STATS["number_too_long"] >= before + 4
