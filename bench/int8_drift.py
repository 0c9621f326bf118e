#!/usr/bin/env python3
"""How much an int8 adapter (`lorakit adapter quantize`) differs from the float adapter it came from.

On a fixed prompt set: the 20 held-out questions of the demo (src/lorakit/data/demo.py) and the
first --alpaca records of ../shared/datasets/alpaca_en_demo.json. One base model is loaded (fp32)
with both adapters on it by name (infer/adapters.load_adapter), and for each prompt:

- next-token logits at the end of the prompt: max and mean |int8 - float|, compared with how far
  the float adapter moves them from the base (the adapter's own effect), and top-1 agreement;
- greedy answers (--max-new-tokens, batched, same batches for both): identical answers out of N,
  and token agreement = positions where both answers have the same token / the longer answer's
  length, summed over prompts;
- the demo's contains-score on the 20 held-out questions (the answer must name the persona).

Also the weights files' sizes and the largest weight error. Prints one JSON object.

usage: python bench/int8_drift.py --adapter lorakit-demo/adapter [--base B] [--alpaca 10] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "datasets" / "alpaca_en_demo.json"


def prompts(n_alpaca: int, alpaca_path: Path):
    from lorakit.data.demo import heldout_items

    items = [(i.question, "", i.must_contain) for i in heldout_items()]
    if n_alpaca:
        records = json.loads(alpaca_path.read_text(encoding="utf-8"))[:n_alpaca]
        items += [(r["instruction"], r.get("input", ""), None) for r in records]
    return items


@torch.no_grad()
def greedy_ids(gen, items, max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy new-token ids per prompt (left-padded batches), cut after the first EOS."""
    from lorakit.infer.generate import GenerationParams

    kw = GenerationParams(max_new_tokens=max_new_tokens).to_kwargs(gen.tokenizer)
    pad, eos = gen.tokenizer.pad_token_id, gen.tokenizer.eos_token_id
    out_ids = []
    for start in range(0, len(items), batch_size):
        chunk = [gen.prompt_ids(q, i) for q, i, _ in items[start : start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        out = gen.model.generate(input_ids=ids, attention_mask=mask, **kw)
        for row in out[:, width:].tolist():
            out_ids.append(row[: row.index(eos) + 1] if eos in row else row)
    return out_ids


@torch.no_grad()
def last_logits(gen, items) -> torch.Tensor:
    rows = []
    for q, i, _ in items:
        ids = torch.tensor([gen.prompt_ids(q, i)])
        rows.append(gen.model(input_ids=ids).logits[0, -1].float())
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, help="float LoRA adapter folder")
    ap.add_argument("--int8", help="its int8 folder (default: quantized here into a temp folder)")
    ap.add_argument("--base", help="base model (default: the adapter's recorded base)")
    ap.add_argument("--alpaca", type=int, default=10, help="alpaca_en_demo records to add (first N)")
    ap.add_argument("--alpaca-path", type=Path, default=ALPACA)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=10)
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from lorakit.infer.adapters import load_adapter
    from lorakit.infer.generate import Generator
    from lorakit.infer.quantize import quantize_adapter, read_int8_adapter

    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory()
    int8_dir = Path(args.int8) if args.int8 else Path(tmp.name) / "int8"
    figures = quantize_adapter(args.adapter, int8_dir) if not args.int8 else None
    if figures is None:  # measure the given pair
        from safetensors.torch import load_file

        ref = load_file(str(Path(args.adapter) / "adapter_model.safetensors"))
        got = read_int8_adapter(int8_dir)
        figures = {
            "size_before_bytes": (Path(args.adapter) / "adapter_model.safetensors").stat().st_size,
            "size_after_bytes": (int8_dir / "adapter_model.int8.safetensors").stat().st_size,
            "max_abs_weight_error": max(float((got[k] - v.float()).abs().max()) for k, v in ref.items()),
        }
        figures["ratio"] = figures["size_before_bytes"] / figures["size_after_bytes"]

    gen = Generator(base=args.base, adapter=args.adapter)  # float adapter as "default", fp32 model
    load_adapter(gen.model, int8_dir, "int8")
    items = prompts(args.alpaca, args.alpaca_path)

    gen.model.set_adapter("default")
    l_float = last_logits(gen, items)
    with gen.model.disable_adapter():
        l_base = last_logits(gen, items)
    gen.model.set_adapter("default")
    a_float = greedy_ids(gen, items, args.max_new_tokens, args.batch_size)
    gen.model.set_adapter("int8")
    l_int8 = last_logits(gen, items)
    a_int8 = greedy_ids(gen, items, args.max_new_tokens, args.batch_size)

    drift = (l_int8 - l_float).abs()
    effect = (l_float - l_base).abs()
    same_tokens = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(a_float, a_int8))
    longer = sum(max(len(a), len(b)) for a, b in zip(a_float, a_int8))
    decode = lambda ids: gen.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    held = [(decode(a), decode(b), must) for (_, _, must), a, b in zip(items, a_float, a_int8) if must]
    differing = [
        {"prompt": q, "float": decode(a), "int8": decode(b)}
        for (q, _, _), a, b in zip(items, a_float, a_int8)
        if a != b
    ]

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    result = {
        "adapter": str(Path(args.adapter).resolve()),
        "base": gen.base,
        "template": gen.template.name,
        "prompts": {
            "total": len(items),
            "demo_heldout": sum(1 for i in items if i[2]),
            "alpaca_en_demo_first": args.alpaca,
        },
        "size": {
            "float_bytes": figures["size_before_bytes"],
            "int8_bytes": figures["size_after_bytes"],
            "ratio": round(figures["ratio"], 3),
        },
        "max_abs_weight_error": figures["max_abs_weight_error"],
        "next_token_logits": {
            "max_abs_diff_int8_vs_float": float(drift.max()),
            "mean_abs_diff_int8_vs_float": float(drift.mean()),
            "max_abs_diff_float_vs_base": float(effect.max()),
            "mean_abs_diff_float_vs_base": float(effect.mean()),
            "top1_agreement": f"{int((l_int8.argmax(-1) == l_float.argmax(-1)).sum())}/{len(items)}",
        },
        "greedy": {
            "max_new_tokens": args.max_new_tokens,
            "identical_answers": f"{sum(a == b for a, b in zip(a_float, a_int8))}/{len(items)}",
            "token_agreement": round(same_tokens / max(longer, 1), 4),
            "tokens_compared": longer,
            "differing_answers": differing,
        },
        "demo_contains_score": {
            "float": f"{sum(must.lower() in a.lower() for a, _, must in held)}/{len(held)}",
            "int8": f"{sum(must.lower() in b.lower() for _, b, must in held)}/{len(held)}",
        },
        "machine": {
            "cpu": cpu,
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    tmp.cleanup()
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
