#!/usr/bin/env python3
"""Generation throughput: base model, base + unmerged LoRA adapter, and the merged model.

Greedy decoding of a fixed number of new tokens (EOS ignored so every run does the same work),
on the default model (smollm2-135m) unless --base is given. The adapter is --adapter, or a LoRA
adapter (r=8 on q_proj,v_proj, random non-zero B) made for the measurement. Then batched
generation throughput at batch 1, 4 and 8. Ends with one JSON line.

usage: python bench/generate_throughput.py [--base B] [--adapter DIR] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is.",
    "Name a famous painting.",
    "How do I boil an egg?",
    "What is 12 times 7?",
    "Describe a sunset in one sentence.",
]


def make_adapter(base_path: str, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_path),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(folder)
    return folder


def tokens_per_s(model, tokenizer, prompts: list[str], new_tokens: int, repeats: int) -> float:
    """Median over repeats of generated tokens / wall time, greedy, left-padded batch."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    with torch.no_grad():
        model.generate(
            **batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )  # warm-up
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(**batch, **kwargs)
            rates.append((out.shape[1] - batch["input_ids"].shape[1]) * len(prompts) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--adapter", type=Path, default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import load_tokenizer, resolve_model_path

    torch.manual_seed(0)
    base_path = resolve_model_path(a.base)
    tok = load_tokenizer(base_path)
    with tempfile.TemporaryDirectory(prefix="lorakit-genbench-") as tmp:
        adapter = a.adapter or make_adapter(base_path, Path(tmp) / "adapter")
        one = PROMPTS[:1]
        base = AutoModelForCausalLM.from_pretrained(base_path).eval()
        r_base = tokens_per_s(base, tok, one, a.new_tokens, a.repeats)
        batched = {n: tokens_per_s(base, tok, PROMPTS[:n], a.new_tokens, a.repeats) for n in (1, 4, 8)}
        unmerged = PeftModel.from_pretrained(base, str(adapter)).eval()
        r_unmerged = tokens_per_s(unmerged, tok, one, a.new_tokens, a.repeats)
        merged = unmerged.merge_and_unload().eval()
        r_merged = tokens_per_s(merged, tok, one, a.new_tokens, a.repeats)
        batched_merged = {n: tokens_per_s(merged, tok, PROMPTS[:n], a.new_tokens, a.repeats) for n in (1, 4, 8)}

    print(f"{'model':<22}{'tokens/s (batch 1)':>20}")
    for name, r in (("base", r_base), ("base + adapter", r_unmerged), ("merged", r_merged)):
        print(f"{name:<22}{r:>20.1f}")
    print(f"{'batch':<8}{'base tokens/s':>16}{'merged tokens/s':>18}")
    for n in (1, 4, 8):
        print(f"{n:<8}{batched[n]:>16.1f}{batched_merged[n]:>18.1f}")
    print(
        json.dumps(
            {
                "base_tokens_per_s": round(r_base, 1),
                "unmerged_tokens_per_s": round(r_unmerged, 1),
                "merged_tokens_per_s": round(r_merged, 1),
                "merged_vs_base": round(r_merged / r_base, 3),
                "unmerged_vs_base": round(r_unmerged / r_base, 3),
                "batched_tokens_per_s": {str(n): round(v, 1) for n, v in batched.items()},
                "batched_merged_tokens_per_s": {str(n): round(v, 1) for n, v in batched_merged.items()},
                "threads": torch.get_num_threads(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
