"""Tiny seeded random Llamas for tests and benchmarks: the real architecture, seconds to build."""
from __future__ import annotations

from pathlib import Path


def save_tiny_llama(out: Path) -> Path:
    """A 2-layer random Llama (seed 0) with a word-level tokenizer, saved as a HF dir in `out`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(125)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out
