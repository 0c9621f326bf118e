#!/usr/bin/env python3
"""Training throughput: lorakit beside the plain transformers.Trainer + peft recipe, same run.

Runs, one after another in separate processes, ../shared/bench/seed_recipe.py --variant seed,
--variant tuned, and lorakit's own trainer, on the same examples for the same number of
optimizer steps: the default model (smollm2-135m), LoRA r=8, alpha 16, dropout 0.05 on
q_proj,v_proj, the alpaca template, EOS appended, micro-batch 4, cutoff_len 256.

Reported per run: tokens/s (real tokens, padding excluded), peak RSS of the process, and train
loss (prompt masked for `tuned` and lorakit, so those two are comparable). Ends with one JSON line.

usage: python bench/train_throughput.py [--steps 24] [--repeats 2] [--data FILE] [--skip-seed] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# bf16 matmul peak on this CPU (~900 GFLOP/s) / (4 x 135M FLOPs per token with a frozen base)
CEILING_TOKENS_PER_S = 1700.0


def run_json(cmd: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{") and line.endswith("}")]
    return json.loads(lines[-1])


def lorakit_run(model: str, data: Path, steps: int, micro: int, cutoff: int, work: Path, overrides: list[str]) -> dict:
    """lorakit's trainer on the first steps*micro records (cycled), like seed_recipe.py."""
    records = json.loads(data.read_text(encoding="utf-8"))
    n = steps * micro
    subset = (records * (n // len(records) + 1))[:n]
    data_file = work / "bench_data.json"
    data_file.write_text(json.dumps(subset, ensure_ascii=False), encoding="utf-8")
    cfg = work / "bench.yaml"
    cfg.write_text(
        f"base_model: {model}\ndata_path: {data_file}\noutput_dir: {work / 'lorakit-out'}\n"
        "overwrite_output_dir: true\nprompt_template_name: alpaca\nadd_eos_token: true\n"
        f"cutoff_len: {cutoff}\nbatch_size: {micro}\nmicro_batch_size: {micro}\nmax_steps: {steps}\n"
        "learning_rate: 3.0e-4\nlora_r: 8\nlora_alpha: 16\nlora_dropout: 0.05\n"
        "lora_target_modules: [q_proj, v_proj]\nval_set_size: 0\nseed: 42\n"
        f"logging_steps: {max(steps // 4, 1)}\nsave_steps: {steps + 1}\nreport_to: []\n"
        "group_by_length: true\n",  # the tuned recipe's sampling, so both train on the same batches
        encoding="utf-8",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit.cli", "train", str(cfg), *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        sys.exit(f"lorakit train failed:\n{proc.stderr[-3000:]}")
    t = json.loads((work / "lorakit-out" / "manifest.json").read_text())["training"]
    return {
        "recipe": "lorakit",
        "steps": t["global_steps"],
        "real_tokens": t["tokens_seen"],
        "wall_s": t["wall_s"],
        "tokens_per_s": round(t["tokens_seen"] / t["wall_s"], 1),
        "train_loss": round(t["train_loss"], 4),
        "peak_rss_mib": t["peak_memory_mib"],
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (its own RSS and loss), so figures stay consistent."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return ordered[(len(ordered) - 1) // 2] if len(ordered) % 2 else ordered[len(ordered) // 2 - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--data", type=Path, default=SHARED / "datasets" / "alpaca_en_demo.json")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--skip-seed", action="store_true", help="skip the slow fp32 seed recipe")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of tuned and lorakit (median)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a lorakit config override for its run (measure one lever at a time)",
    )
    a = ap.parse_args()

    from lorakit.models.registry import pull

    model = str(pull("smollm2-135m"))
    recipe = SHARED / "bench" / "seed_recipe.py"
    common = [
        "--model",
        model,
        "--data",
        str(a.data),
        "--steps",
        str(a.steps),
        "--micro-batch",
        str(a.micro_batch),
        "--cutoff",
        str(a.cutoff),
        "--r",
        "8",
        "--alpha",
        "16",
        "--targets",
        "q_proj,v_proj",
    ]
    runs: dict[str, list[dict]] = {"seed": [], "tuned": [], "lorakit": []}
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        if not a.skip_seed:  # slow and far behind: once is enough
            runs["seed"].append(run_json([sys.executable, str(recipe), "--variant", "seed", *common]))
        # Interleaved repeats, medians reported: on a shared VM the speed drifts by 10-20% over
        # minutes, which one run of each would turn into noise in the ratio.
        for _ in range(a.repeats):
            runs["tuned"].append(run_json([sys.executable, str(recipe), "--variant", "tuned", *common]))
            runs["lorakit"].append(
                lorakit_run(model, a.data, a.steps, a.micro_batch, a.cutoff, Path(tmp), a.overrides)
            )
    results = {name: median_run(rs) for name, rs in runs.items() if rs}
    for name, rs in runs.items():
        if len(rs) > 1:
            print(f"{name}: tokens/s per repeat " + ", ".join(f"{r['tokens_per_s']:.1f}" for r in rs))

    print(f"{'recipe':<10}{'tokens':>9}{'wall s':>9}{'tokens/s':>10}{'peak RSS MiB':>14}{'train loss':>12}")
    for name, r in results.items():
        print(
            f"{name:<10}{r['real_tokens']:>9}{r['wall_s']:>9.1f}{r['tokens_per_s']:>10.1f}"
            f"{r['peak_rss_mib']:>14.0f}{r['train_loss']:>12.4f}"
        )
    lk, tu = results["lorakit"], results["tuned"]
    seed_tps = results["seed"]["tokens_per_s"] if "seed" in results else None
    print(
        json.dumps(
            {
                "lorakit_tokens_per_s": lk["tokens_per_s"],
                "seed_tokens_per_s": seed_tps,
                "tuned_tokens_per_s": tu["tokens_per_s"],
                "ratio_vs_seed": round(lk["tokens_per_s"] / seed_tps, 3) if seed_tps else None,
                "ratio_vs_tuned": round(lk["tokens_per_s"] / tu["tokens_per_s"], 3),
                "rss_ratio_vs_tuned": round(lk["peak_rss_mib"] / tu["peak_rss_mib"], 3),
                "loss_lorakit": lk["train_loss"],
                "loss_tuned": tu["train_loss"],
                "ceiling_share": round(lk["tokens_per_s"] / CEILING_TOKENS_PER_S, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
