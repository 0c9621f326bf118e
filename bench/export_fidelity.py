#!/usr/bin/env python3
"""Every export format and quant of an adapter, verified: size, fidelity and speed.

For each adapter given: the verification prompts and lorakit's reference answers are made once
(infer/verify.py: the adapter's validation examples, else its first training prompts; lorakit's
Generator, base + adapter, fp32, greedy, batch 1), then each export is written with lorakit's own
export code (export_hf, export_gguf, export_gguf_lora) into a temporary folder and verified against
that same reference, as ``lorakit export`` does. One row per export:

- size (MiB) of the file(s) a user deploys (the GGUF LoRA alone for gguf-lora; its base is listed);
- greedy answers identical out of N, top-1 agreement and mean KL (teacher forced, over lorakit's
  answer tokens), whether it passed its rule (verify.THRESHOLDS);
- generation tokens/s at batch 1 in the export's runtime (llama.cpp for GGUF, transformers for hf)
  on the same prompts, and lorakit's own generate (HF, fp32) tokens/s measured in the same run, and
  their ratio (the machine is shared and noisy: read the ratio, not the absolute figure).

Prints a Markdown table, then the whole result as one JSON object on the last line.

usage: python bench/export_fidelity.py --adapter lorakit-demo/adapter --adapter other/adapter
       [--formats hf,f16,bf16,q8_0,q4_k_m,q5_k_m,q6_k,gguf-lora] [--prompts 32] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ALL_FORMATS = ("hf", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k", "gguf-lora")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def run_one(adapter_dir: Path, fmt: str, reference, base: str, work: Path) -> dict:
    from lorakit.infer import gguf
    from lorakit.infer.export import export_hf
    from lorakit.infer.verify import VerificationFailed

    out = work / fmt
    started = time.perf_counter()
    try:
        if fmt == "hf":
            record = export_hf(adapter_dir, out, base=base, reference=reference)
        elif fmt == "gguf-lora":
            record = gguf.export_gguf_lora(adapter_dir, out, base=base, reference=reference)
        else:
            record = gguf.export_gguf(adapter_dir, out, base=base, quant=fmt, reference=reference)
    except VerificationFailed as e:
        record = e.record or {"verification": e.figures, "files": []}
    seconds = time.perf_counter() - started
    v = record.get("verification") or {}
    files = record.get("files") or []
    deployed = files[:1] if fmt == "gguf-lora" else files
    row = {
        "adapter": adapter_dir.name if adapter_dir.name != "adapter" else adapter_dir.parent.name,
        "format": "hf (fp32)" if fmt == "hf" else ("gguf-lora (f16)" if fmt == "gguf-lora" else f"gguf {fmt}"),
        "size_mib": round(sum(f["bytes"] for f in deployed) / 2**20, 1),
        "prompts": v.get("prompts"),
        "greedy_identical": v.get("greedy_identical"),
        "top1_agreement": v.get("top1_agreement"),
        "mean_kl": v.get("mean_kl"),
        "tokens_compared": v.get("tokens_compared"),
        "passed": bool(record.get("verified")),
        "rule": {"min_greedy_share": v.get("min_greedy_identical_share"), "min_top1": v.get("min_top1_agreement")},
        "tokens_per_s": v.get("tokens_per_s"),
        "lorakit_tokens_per_s": round(reference.tokens_per_s, 1),
        "speed_vs_lorakit": round(v["tokens_per_s"] / reference.tokens_per_s, 2)
        if v.get("tokens_per_s") and reference.tokens_per_s
        else None,
        "export_seconds": round(seconds, 1),
    }
    if fmt == "gguf-lora" and len(files) > 1:
        row["base_gguf_mib"] = round(files[1]["bytes"] / 2**20, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", action="append", required=True, help="adapter folder (repeat)")
    parser.add_argument("--formats", default=",".join(ALL_FORMATS))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from lorakit.infer.adapters import check_adapter_dir
    from lorakit.infer.gguf import llama_cpp_python_version
    from lorakit.infer.verify import free_memory, lorakit_reference, verification_set
    from lorakit.models.registry import DEFAULT_BASE_MODEL
    from lorakit.runfolder import recorded_base_model

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    rows = []
    for given in args.adapter:
        adapter_dir = check_adapter_dir(given)
        base = recorded_base_model(adapter_dir) or DEFAULT_BASE_MODEL
        vset = verification_set(adapter_dir, None, args.prompts)
        reference = lorakit_reference(adapter_dir, base, vset, args.new_tokens)
        print(
            f"# {adapter_dir}: {len(vset.prompts)} prompts ({vset.source}); lorakit {reference.tokens_per_s:.1f} tok/s"
        )
        with tempfile.TemporaryDirectory(prefix="lorakit-export-bench-") as tmp:
            for fmt in formats:
                row = run_one(adapter_dir, fmt, reference, base, Path(tmp))
                rows.append(row)
                print(json.dumps(row), flush=True)
                free_memory()
    header = (
        "| adapter | format | size MiB | greedy identical | top-1 | mean KL | passed | tokens/s | lorakit tokens/s "
        "| ratio |\n|---|---|---:|---:|---:|---:|---|---:|---:|---:|"
    )
    print(header)
    for r in rows:
        print(
            f"| {r['adapter']} | {r['format']} | {r['size_mib']} | {r['greedy_identical']}/{r['prompts']} | "
            f"{r['top1_agreement']:.2%} | {r['mean_kl']:.2g} | {'yes' if r['passed'] else 'NO'} | "
            f"{r['tokens_per_s']} | {r['lorakit_tokens_per_s']} | {r['speed_vs_lorakit']} |"
        )
    result = {
        "bench": "export_fidelity",
        "machine": machine(),
        "llama_cpp_python": llama_cpp_python_version(),
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
