"""Shared fixtures: a tiny random Llama and a tokenizer trained here, saved as a local HF folder.

Nothing is downloaded. The tokenizer is a byte-level BPE fit on GSM8K-like text in well under a
second; the model has head_dim 32, which vLLM's CPU attention accepts.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GSM8K = os.environ.get("GSM8K_DIR", os.path.join(os.path.dirname(ROOT), "shared", "data", "gsm8k"))  # the jsonl folder


def make_tiny_model(path, vocab=512, hidden=64, layers=2, heads=2, kv_heads=1, seed=0):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    texts = ["<think> </think> <answer> </answer> User: Assistant: 0123456789 + - * / = $ ,",
             "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
             "How many clips did Natalia sell altogether? The answer is 72 dollars."] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
