"""Batching: padded batches, or padding-free packed ones (``packing: true``).

Packed: the micro-batch's examples are concatenated into one row with no padding, and
``position_ids`` restart at 0 for each example (transformers' DataCollatorWithFlattening).
There is no attention mask; the model finds the example boundaries from the position_ids
restarts (masking_utils.find_packed_sequence_indices) and builds a block-diagonal causal mask
(sdpa, eager, flex), or flash-attention derives its varlen boundaries from them. The first
label of each example becomes -100 so no example's first token is predicted from the end of
the one before; a padded batch never predicts it either (the causal-LM shift drops label 0),
so both batch forms train on exactly the same label tokens and Trainer's token count
(labels[..., 1:] != -100) is the same.

Isolation is not guaranteed by every model: transformers only builds the packed mask when no KV
cache is passed, and ``config.use_cache=True`` (Llama's default) makes the model create one,
after which the examples silently attend to each other. Models with their own (remote) code may
ignore position_ids altogether. So ``packing_supported`` measures it on the model itself.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .tokenize import IGNORE_INDEX


def build_collator(tokenizer, packing: bool, pad_to_multiple_of: int = 8):
    """The Trainer's data_collator: padded (DataCollatorForSeq2Seq) or padding-free (packing)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        # Drops attention_mask on purpose: a mask would turn the packed-sequence detection off.
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX, return_tensors="pt")
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding=True,
        pad_to_multiple_of=pad_to_multiple_of,
        label_pad_token_id=IGNORE_INDEX,
        return_tensors="pt",
    )


def _attn_name(model) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "unknown")


@torch.no_grad()
def packing_supported(model, atol: float = 1e-3) -> tuple[bool, str]:
    """(True, "") when the model, called the way the Trainer calls it with a packed batch, keeps
    packed examples apart; else (False, why). Probe: pack [A, C] and [B, C] with A != B; if C's
    logits depend on which example precedes it, attention leaks across the boundary. Same shapes
    in both runs, so an isolating model gives C the same logits up to rounding, in any dtype."""
    impl = _attn_name(model)
    emb = model.get_input_embeddings()
    vocab, device = emb.num_embeddings, emb.weight.device
    g = torch.Generator().manual_seed(0)
    a, c = torch.randint(0, vocab, (5,), generator=g), torch.randint(0, vocab, (6,), generator=g)
    b = (a + 1) % vocab  # differs from a at every position
    pos = torch.cat([torch.arange(5), torch.arange(6)])[None].to(device)
    was_training = model.training
    model.eval()  # no dropout in the probe
    try:
        outs = [
            model(input_ids=torch.cat([first, c])[None].to(device), position_ids=pos).logits[0, 5:].float()
            for first in (a, b)
        ]
    except Exception as e:  # e.g. remote code without position_ids
        first_line = (str(e).strip().splitlines() or [""])[0]
        return False, f"the model ({impl} attention) cannot run a packed batch: {type(e).__name__}: {first_line}"
    finally:
        model.train(was_training)
    diff = (outs[0] - outs[1]).abs().max().item()
    if diff > atol * (1 + outs[1].abs().max().item()):
        # The usual cause: with a KV cache transformers skips the packed-sequence mask.
        cause = " because model.config.use_cache is on" if getattr(model.config, "use_cache", False) else ""
        return False, (
            f"the model's {impl} attention lets packed examples attend to each other{cause} "
            f"(logits moved by {diff:.3g})"
        )
    return True, ""


def require_packing(model) -> None:
    """Refuse ``packing: true`` in one line rather than train on mixed examples."""
    ok, why = packing_supported(model)
    if not ok:
        raise ConfigError(f"packing: {why}; set packing: false")
