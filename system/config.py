"""The run's settings: how a Config is read, checked and explained, and the systems tier's own settings.

train.Config holds the algorithm's fields; its `system` field is a SystemConfig (below): how fast and where the run
goes (micro-batching, packing, compile, the engine, the Serve app and weight sync, checkpoints kept, logging). A run's
YAML and the command line name fields of either flat (`--compile=true`) or, in YAML, under a `system:` section; the
resolved config is saved nested. Each field's allowed values live beside it (`knob`); `check` enforces them, so a new
field with a range is checked with no other edit. Nothing here imports torch: `python train.py` reports a bad setting
before the heavy imports.
"""
import dataclasses
import difflib
import inspect
import math
import re
import sys

import yaml


class ConfigError(ValueError):
    """A setting that cannot work, refused before anything loads; its message names the fix. On the command line
    (cli) it is one line and exit status 2, not a traceback: the user's mistake, not a crash."""


_INTERVAL = re.compile(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])")


def knob(default, allowed: str | tuple = "", why: str = ""):
    """A dataclass field with its allowed values: an interval ("[2, inf)", "(0, 1]") or a tuple of choices, and why
    (shown with the error). check() enforces them."""
    if isinstance(allowed, str) and allowed and not _INTERVAL.fullmatch(allowed):
        raise ValueError(f"knob range {allowed!r}: write an interval such as [0, 1) or (0, inf)")
    return dataclasses.field(default=default, metadata={"allowed": allowed, "why": why})


@dataclasses.dataclass
class SystemConfig:
    # --- batching and kernels: the same update, faster
    micro_batch_size: int = knob(8, "[1, inf)")  # sequences per forward/backward; gradients accumulate over the step
    packing: bool = True  # micro-batch = one row of concatenated sequences, no padding (varlen attention)
    share_prompts: bool = True  # packed: a prompt runs once for the G completions of it in a micro-batch (exact)
    logprob_chunk: int = knob(1024, "[1, inf)")  # tokens per lm_head + log-softmax chunk (bounds [tokens, vocab])
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    compile: bool = False  # torch.compile the policy's decoder layers and log-softmax chunks: fused elementwise work
    # --- the torch engine: in process (inference local), and in the Serve app's replicas under the same names
    # (ENGINE_ROWS, COMPILE_ENGINE, FUSE_ENGINE: infer_workers.build_app)
    compile_engine: bool = False  # torch.compile TorchEngine's decode step and sampler
    fuse_engine: bool = True  # q/k/v and gate/up as one GEMM each (the same math; false: separate GEMMs, the
    # reference path exps/check_recipe.sh compares against)
    engine_rows: int = knob(0, "[0, inf)")  # TorchEngine's cache rows, sequences decoded at once (its KV cache's
    # memory); 0 = system.engine.default_max_batch
    # --- the Serve app and weight sync (inference serve)
    inference: str = knob("local", ("local", "serve"))  # local: an in-process TorchEngine per rank | serve: a
    # running app of infer_workers.py
    max_staleness: int = knob(0, "[0, 1]", "0 = on-policy; 1 = the next batch is sampled while this one trains")  # 1:
    # one step off-policy, the replicas sample the next step's batch (with the weights one version behind) while
    # this step trains (inference serve); 0: on-policy, sample then train
    serve_app: str = "default"  # that app's name (serve run --name); found through ray_address
    ray_address: str = "auto"  # the Ray cluster the app runs on
    sync_host: str = "127.0.0.1"  # address replicas reach this trainer's sync store on (its IP, multi-node)
    sync_port: int = knob(0, "[0, 65535]", "0 picks a free port")  # port of that store; 0 = any free one
    sync_bucket_mb: float = knob(1024.0, "(0, inf)")  # weight-sync bucket size, MiB of the engine dtype (the pusher
    # keeps 2 pack buffers)
    sync_ipc: str = knob("auto", ("auto", "always", "never"))  # auto: a replica on this trainer's GPU reads its
    # weights via CUDA IPC, the others get the broadcast | always: CPU replicas on this machine too (shared memory)
    # | never (weight_sync.WeightSync)
    sync_timeout_s: float = knob(300.0, "(0, inf)")  # every sync wait and generate request gives up after this, s
    # --- checkpoints kept, time limits, logging
    keep_ckpts: int = knob(2, "[1, inf)", "the newest checkpoint is what --resume needs")  # newest kept on disk
    keep_best: bool = True  # ckpt/best/model: the weights with the best validation strict so far (chosen on the
    # validation set, never the test set), kept beside the newest checkpoints: a run that degenerates late keeps them
    stop_after_min: float = knob(0.0, "[0, inf)", "0 = never")  # checkpoint and exit after the step that passes
    # this many minutes (0 = never); for time-limited jobs: run again with --resume to go on
    wandb_project: str = ""  # "" = no wandb; WANDB_MODE=offline works

    def __post_init__(self):
        check(self)
        if self.max_staleness and self.inference != "serve":
            raise ConfigError("max_staleness=1 needs inference=serve: the in-process engine shares this process and "
                              "its GPU with training, so nothing would overlap")


def check(cfg) -> None:
    """Every field of the dataclass cfg within what its knob allows, else a ConfigError that names the fix (not
    assert: python -O keeps it)."""
    for f in dataclasses.fields(cfg):
        allowed, v = f.metadata.get("allowed"), getattr(cfg, f.name)
        if isinstance(allowed, tuple) and v not in allowed:
            raise ConfigError(f"{f.name}={v!r}: use one of {', '.join(allowed)}")
        if isinstance(allowed, str) and allowed:
            lo_b, lo, hi, hi_b = _INTERVAL.fullmatch(allowed).groups()
            lo, hi = float(lo), float(hi)
            if v < lo or v > hi or (lo_b == "(" and v == lo) or (hi_b == ")" and v == hi) or v != v:
                span = f"{lo_b}{_num(lo, v)}, {'inf' if math.isinf(hi) else _num(hi, v)}{hi_b}"
                why = f.metadata.get("why")
                raise ConfigError(f"config {f.name}={v!r} is outside {span}" + (f": {why}" if why else ""))


def _num(x: float, like):
    """An interval's bound as the field's type shows it: [2, inf) for an int, (0.0, inf) for a float."""
    return int(x) if isinstance(like, int) and x == int(x) else float(x)


def fields_by_name(cls) -> dict:
    """Every settable field of cls (train.Config) and of its `system` SystemConfig: name -> (dataclass, field)."""
    out = {f.name: (cls, f) for f in dataclasses.fields(cls) if f.name != "system"}
    return out | {f.name: (SystemConfig, f) for f in dataclasses.fields(SystemConfig)}


def make(cls, values: dict):
    """{name: value} (flat, or with a nested "system" mapping) -> cls, each name routed to cls or its SystemConfig.
    Unknown names and wrong types are ConfigErrors; a near miss is suggested."""
    values, known = dict(values), fields_by_name(cls)
    nested = values.pop("system", None) or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"config system: must hold key: value lines, got {type(nested).__name__}")
    top, system = {}, {}
    for key, val in [*nested.items(), *values.items()]:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"unknown config key {key!r}" + (f": did you mean {near[0]!r}?" if near else "") +
                              " (--help lists every key)")
        owner, f = known[key]
        (system if owner is SystemConfig else top)[key] = _typed(key, val, f.type)
    return cls(**top, system=SystemConfig(**system))


def _typed(key, val, want):
    want = {"int": int, "float": float, "str": str, "bool": bool}.get(want, want)  # annotations may be strings
    if want is float and not isinstance(val, bool) and isinstance(val, (int, str)):
        try:  # YAML reads 1e-6 (no dot) as a string, and 2 as an int
            val = float(val)
        except ValueError:
            pass  # reported below
    if want is str and not isinstance(val, str) and val is not None and not isinstance(val, bool):
        val = str(val)  # --model=123 is still a name
    if type(val) is not want:
        raise ConfigError(f"config {key}={val!r} is {type(val).__name__}, expected {want.__name__}")
    return val


def replace(cfg, **values):
    """cfg with some fields changed, each routed to cfg or cfg.system by its name: replace(cfg, lr=2e-6, compile=True).
    """
    flat = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "system"} | dataclasses.asdict(cfg.system)
    return make(type(cfg), flat | values)


def parse_config(cls, argv: list[str]):
    """[config.yaml] [--key=value ...] -> cls. Unknown keys and wrong types are errors (ConfigError)."""
    values = {}
    if argv and not argv[0].startswith("-"):
        try:
            with open(argv[0]) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config file {argv[0]!r}: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {argv[0]!r} must hold key: value lines, got {type(values).__name__}")
        argv = argv[1:]
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key=value, got {arg!r} (a config file comes first, then overrides)")
        key, eq, val = arg[2:].partition("=")
        key = key.removeprefix("system.")
        try:
            values[key] = (yaml.safe_load(val) if val else "") if eq else True  # a bare --flag: True; --key= is ""
        except yaml.YAMLError:
            values[key] = val  # not YAML (e.g. "a: b"): the text itself, checked against the field's type
    return make(cls, values)


def config_help(cls, usage: str) -> str:
    """--help: every field of cls, then of SystemConfig under its own heading, each under its section with its type,
    default, the comment beside it in the source and what it allows (the dataclasses are the one source of all)."""
    out = [usage]
    for c, heading in ((cls, None), (SystemConfig, "=== systems: speed, serving, checkpoints (system/config.py)")):
        if heading:
            out += ["", heading]
        fields, last = {f.name: f for f in dataclasses.fields(c)}, None
        for line in inspect.getsource(c).splitlines()[1:] + ["def"]:
            s = line.strip()
            field = re.match(r"(\w+): [\w |]+ = .*?(?:  # (.*))?$", s)
            if last and not (s.startswith("# ") and not s.startswith("# ---")):  # the field's text is complete
                allowed = last.metadata.get("allowed")
                if allowed:
                    out[-1] += f" (in {allowed})" if isinstance(allowed, str) else f" (one of {', '.join(allowed)})"
                last = None
            if s.startswith("def "):
                break
            if s.startswith("# ---"):
                out += ["", s[5:].strip()]
            elif field and field.group(1) in fields and field.group(1) != "system":
                last = f = fields[field.group(1)]
                default = f'"{f.default}"' if isinstance(f.default, str) and not f.default else f.default
                out.append(f"  --{f.name}={default}".ljust(30) + f" {f.type.__name__:5}  {field.group(2) or ''}")
            elif s.startswith("# ") and out[-1].startswith("  --"):  # a comment's continuation line
                out[-1] += " " + s[2:]
    return "\n".join(out)


def cli(cls, argv: list[str], usage: str):
    """The command line of a script configured by cls: -h / --help prints config_help and exits 0; a ConfigError (a
    bad value, key or file) prints its one line and exits 2. Returns the config. Called before the heavy imports."""
    if {"-h", "--help"} & set(argv):
        print(config_help(cls, usage))
        sys.exit(0)
    try:
        return parse_config(cls, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
