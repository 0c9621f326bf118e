"""Tiny models the llama.cpp tests build (imported by test modules; conftest.py cannot be, as
tests/faults has a conftest of its own)."""

from __future__ import annotations

from pathlib import Path


def build_tiny_smol_model(folder: Path, smollm2_path: Path) -> Path:
    """A 2-layer random Llama (hidden 64) with smollm2's tokenizer (llama.cpp converts its vocab)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.5,  # wide logits: few near-ties for f16 rounding to flip
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
