#!/usr/bin/env python3
"""Training throughput: lorakit beside the plain transformers.Trainer + peft recipe, same run.

Runs, one after another in separate processes, ../shared/bench/seed_recipe.py --variant seed,
--variant tuned, and lorakit's own trainer, on the same examples for the same number of
optimizer steps: the default model (smollm2-135m), LoRA r=8, alpha 16, dropout 0.05 on
q_proj,v_proj, the alpaca template, EOS appended, micro-batch 4, cutoff_len 256.

Reported per run: tokens/s (real tokens, padding excluded), peak RSS of the process, and train
loss (prompt masked for `tuned` and lorakit, so those two are comparable). Ends with one JSON line.

--peer llamafactory adds LLaMA-Factory (PyPI `llamafactory`, in its own venv: the Python named by
LORAKIT_LLAMAFACTORY_PYTHON, else ${LORAKIT_LLAMAFACTORY_VENV:-~/.cache/lorakit/llamafactory-venv},
made by scripts/install-llamafactory.sh) to the same run, its repeats interleaved with the others:
the same model folder and records (written as an alpaca-format dataset), LoRA r 8 / alpha 16 /
dropout 0.05 on q_proj,v_proj, its `alpaca` template (prompt masked, its default), cutoff_len 256,
per-device batch 4, no gradient accumulation, the same max_steps, learning rate and seed, bf16 on
the CPU where lorakit picks bf16 on this machine, else fp32 (use_cpu, or no_cuda where its
transformers has no use_cpu; it loads the weights in the model's own fp32 and trains under bf16
autocast, like the tuned recipe), length grouping like the
other two (so the batches match theirs), no eval, no checkpoints (save_strategy no; it still
writes the final adapter, its state and metrics files). LLaMA-Factory checkpoints activations by default;
that is turned off (disable_gradient_checkpointing), as neither the tuned recipe nor lorakit
recompute them: --peer-set disable_gradient_checkpointing=false measures its default.
Its tokens/s is num_input_tokens_seen / train_runtime, both from LLaMA-Factory's own Trainer:
include_num_input_tokens_seen is set to "non_padding", which in transformers 5.x sums the batch's
attention mask (padding excluded; plain `true` would count padded input_ids.numel()), and
train_runtime is trainer.train()'s wall time, the same span the tuned recipe times. The count is
checked against the real tokens of the tokenized records it trained on (one epoch); a mismatch
fails the run. Its loss is not quite comparable: its alpaca template differs a little (the input
follows the instruction in one block; "\n\n" after EOS is trained).

The machine is named first (CPU, threads, native bf16 or not, the fp32 and bf16 matmul rates it
reaches on the model's own shapes) and its facts go into the JSON line. The peer trains in the
precision lorakit's `precision: auto` picks here (bf16 autocast where the CPU has native bf16, else
fp32); the tuned recipe always asks for bf16. On a CPU without native bf16 torch emulates it (a
bf16 matmul ~50-100x slower than fp32), so ratio_vs_tuned there measures lorakit's precision choice,
not its training loop, and a line says so; --skip-tuned leaves the (slow) tuned recipe out.

usage: python bench/train_throughput.py [--steps 24] [--repeats 3] [--data FILE] [--skip-seed] [--skip-tuned]
                                        [--set KEY=VALUE] [--peer llamafactory] [--peer-set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from machine_facts import describe, machine_facts

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


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
    manifest = json.loads((work / "lorakit-out" / "manifest.json").read_text())
    t = manifest["training"]
    return {
        "recipe": "lorakit",
        "precision": manifest["precision"],
        "steps": t["global_steps"],
        "real_tokens": t["tokens_seen"],
        "wall_s": t["wall_s"],
        "tokens_per_s": round(t["tokens_seen"] / t["wall_s"], 1),
        "train_loss": round(t["train_loss"], 4),
        "peak_rss_mib": t["peak_memory_mib"],
    }


# Runs inside the peer's venv: LLaMA-Factory's own entry point (run_exp) on the settings in
# argv[1], with a callback that reads the Trainer's figures; prints one JSON line.
PEER_LLAMAFACTORY = r"""
import json, resource, sys
import llamafactory, torch, transformers
from llamafactory.train.tuner import run_exp
from transformers import TrainerCallback, TrainingArguments

args = json.load(open(sys.argv[1]))
fields = TrainingArguments.__dataclass_fields__
args["use_cpu" if "use_cpu" in fields else "no_cuda"] = True
if "train_sampling_strategy" in fields:  # transformers 5.x
    args["train_sampling_strategy"] = "group_by_length"
else:
    args["group_by_length"] = True
seen = {}


class Figures(TrainerCallback):
    def on_train_begin(self, a, state, control, train_dataloader=None, **kw):
        seen["dataset_tokens"] = sum(len(r["input_ids"]) for r in train_dataloader.dataset)
        seen["records"] = len(train_dataloader.dataset)

    def on_train_end(self, a, state, control, **kw):
        seen["steps"] = state.global_step
        seen["epoch"] = state.epoch
        seen["num_input_tokens_seen"] = state.num_input_tokens_seen
        final = [h for h in state.log_history if "train_runtime" in h][-1]
        seen["train_runtime"] = final["train_runtime"]
        seen["train_loss"] = final["train_loss"]


run_exp(args, callbacks=[Figures()])
seen["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
seen["versions"] = {
    "llamafactory": llamafactory.__version__,
    "transformers": transformers.__version__,
    "torch": torch.__version__,
}
print(json.dumps(seen))
"""


def peer_python() -> Path | None:
    """LLaMA-Factory's Python: LORAKIT_LLAMAFACTORY_PYTHON, else the venv of scripts/install-llamafactory.sh."""
    if os.environ.get("LORAKIT_LLAMAFACTORY_PYTHON"):
        return Path(os.environ["LORAKIT_LLAMAFACTORY_PYTHON"]).expanduser()
    from lorakit.models.registry import lorakit_home

    venv = Path(os.environ.get("LORAKIT_LLAMAFACTORY_VENV") or lorakit_home() / "llamafactory-venv").expanduser()
    return venv / "bin" / "python"


def llamafactory_run(
    python: Path,
    model: str,
    data: Path,
    steps: int,
    micro: int,
    cutoff: int,
    work: Path,
    overrides: list[str],
    bf16: bool,
) -> dict:
    """LLaMA-Factory's SFT LoRA training on the first steps*micro records (cycled), in its own venv.

    bf16: its bf16 autocast on or off; the caller passes lorakit's own choice on this machine, so
    the two train in the same precision (--peer-set bf16=... overrides it)."""
    records = json.loads(data.read_text(encoding="utf-8"))
    n = steps * micro
    subset = (records * (n // len(records) + 1))[:n]
    peer = work / "llamafactory"
    out = peer / "out"
    if peer.exists():
        shutil.rmtree(peer)
    (peer / "data").mkdir(parents=True)
    (peer / "data" / "bench.json").write_text(json.dumps(subset, ensure_ascii=False), encoding="utf-8")
    # alpaca format: instruction / input / output, LLaMA-Factory's default columns
    (peer / "data" / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}))
    args = {
        "model_name_or_path": model,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target": "q_proj,v_proj",
        "disable_gradient_checkpointing": True,
        "dataset": "bench",
        "dataset_dir": str(peer / "data"),
        "template": "alpaca",
        "cutoff_len": cutoff,
        "overwrite_cache": True,
        "output_dir": str(out),
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3.0e-4,
        "max_steps": steps,
        "bf16": bf16,
        "seed": 42,
        "include_num_input_tokens_seen": "non_padding",
        "logging_steps": max(steps // 4, 1),
        "save_strategy": "no",
        "report_to": "none",
        "plot_loss": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    for item in overrides:
        key, _, value = item.partition("=")
        args[key] = yaml.safe_load(value)
    (peer / "args.json").write_text(json.dumps(args))
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(peer / "hf-datasets"),
        "PYTHONPATH": "",
    }
    r = run_json([str(python), "-c", PEER_LLAMAFACTORY, str(peer / "args.json")], env=env)
    if r["num_input_tokens_seen"] != round(r["dataset_tokens"] * r["epoch"]):
        sys.exit(
            f"llamafactory: num_input_tokens_seen {r['num_input_tokens_seen']} != the real tokens of the "
            f"records it trained on ({r['dataset_tokens']} x {r['epoch']} epochs): padding counted?"
        )
    return {
        "recipe": "llamafactory",
        "steps": r["steps"],
        "real_tokens": r["num_input_tokens_seen"],
        "wall_s": r["train_runtime"],
        "tokens_per_s": round(r["num_input_tokens_seen"] / r["train_runtime"], 1),
        "train_loss": round(r["train_loss"], 4),
        "peak_rss_mib": r["peak_rss_mib"],
        "precision": "bf16" if args["bf16"] else "fp32",
        "versions": r["versions"],
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
    ap.add_argument(
        "--skip-tuned",
        action="store_true",
        help="skip the tuned recipe (e.g. on a CPU without native bf16, where its bf16 is emulated and slow)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of tuned, lorakit and the peer (median)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a lorakit config override for its run (measure one lever at a time)",
    )
    ap.add_argument(
        "--peer",
        choices=["llamafactory"],
        help="also run this framework in the same run, interleaved (LLaMA-Factory: its own venv)",
    )
    ap.add_argument(
        "--peer-set",
        dest="peer_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a LLaMA-Factory argument override for the peer's run (value parsed as YAML)",
    )
    a = ap.parse_args()
    peer_py = None
    if a.peer == "llamafactory":
        peer_py = peer_python()
        if not peer_py.is_file():
            sys.exit(
                f"--peer llamafactory: no Python at {peer_py}; install it with "
                "`bash scripts/install-llamafactory.sh` (or set LORAKIT_LLAMAFACTORY_PYTHON)"
            )

    from lorakit.models.registry import pull

    machine = machine_facts()
    print(describe(machine), flush=True)
    emulated = not machine["native_bf16"] and not a.skip_tuned
    if emulated:
        print(
            "note: this CPU has no native bf16, so the tuned recipe's bf16 autocast is emulated here "
            f"(bf16 matmul {machine['matmul_gflops_bf16']} vs fp32 {machine['matmul_gflops_fp32']} GFLOP/s) and "
            "runs many times slower; ratio_vs_tuned on this machine measures lorakit's precision choice "
            "(fp32 here), not its training loop. --skip-tuned leaves it out.",
            flush=True,
        )
    peer_bf16 = machine["lorakit_precision"] == "bf16"
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
    runs: dict[str, list[dict]] = {"seed": [], "tuned": [], "lorakit": [], "llamafactory": []}
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        if not a.skip_seed:  # slow and far behind: once is enough
            runs["seed"].append(run_json([sys.executable, str(recipe), "--variant", "seed", *common]))
        # Interleaved repeats, medians reported: on a shared VM the speed drifts by 10-20% over
        # minutes, which one run of each would turn into noise in the ratio.
        for _ in range(a.repeats):
            if not a.skip_tuned:
                tuned = run_json([sys.executable, str(recipe), "--variant", "tuned", *common])
                runs["tuned"].append({**tuned, "precision": "bf16"})
            runs["lorakit"].append(
                lorakit_run(model, a.data, a.steps, a.micro_batch, a.cutoff, Path(tmp), a.overrides)
            )
            if peer_py is not None:
                runs["llamafactory"].append(
                    llamafactory_run(
                        peer_py,
                        model,
                        a.data,
                        a.steps,
                        a.micro_batch,
                        a.cutoff,
                        Path(tmp),
                        a.peer_overrides,
                        bf16=peer_bf16,
                    )
                )
    results = {name: median_run(rs) for name, rs in runs.items() if rs}
    for name, rs in runs.items():
        if len(rs) > 1:
            print(f"{name}: tokens/s per repeat " + ", ".join(f"{r['tokens_per_s']:.1f}" for r in rs))

    if "llamafactory" in results:
        print("llamafactory: " + ", ".join(f"{k} {v}" for k, v in results["llamafactory"]["versions"].items()))
    print(
        f"{'recipe':<13}{'precision':>10}{'tokens':>9}{'wall s':>9}{'tokens/s':>10}"
        f"{'peak RSS MiB':>14}{'train loss':>12}"
    )
    for name, r in results.items():
        print(
            f"{name:<13}{r.get('precision', 'fp32'):>10}{r['real_tokens']:>9}{r['wall_s']:>9.1f}"
            f"{r['tokens_per_s']:>10.1f}"
            f"{r['peak_rss_mib']:>14.0f}{r['train_loss']:>12.4f}"
        )
    lk, tu = results["lorakit"], results.get("tuned")
    seed_tps = results["seed"]["tokens_per_s"] if "seed" in results else None
    lf = results.get("llamafactory")
    print(
        json.dumps(
            {
                "lorakit_tokens_per_s": lk["tokens_per_s"],
                "seed_tokens_per_s": seed_tps,
                "tuned_tokens_per_s": tu["tokens_per_s"] if tu else None,
                "ratio_vs_seed": round(lk["tokens_per_s"] / seed_tps, 3) if seed_tps else None,
                "ratio_vs_tuned": round(lk["tokens_per_s"] / tu["tokens_per_s"], 3) if tu else None,
                "tuned_bf16_emulated": emulated,
                "rss_ratio_vs_tuned": round(lk["peak_rss_mib"] / tu["peak_rss_mib"], 3) if tu else None,
                "loss_lorakit": lk["train_loss"],
                "loss_tuned": tu["train_loss"] if tu else None,
                "ceiling_share": round(lk["tokens_per_s"] / machine["ceiling_tokens_per_s"], 3),
                "llamafactory_tokens_per_s": lf["tokens_per_s"] if lf else None,
                "ratio_vs_llamafactory": round(lk["tokens_per_s"] / lf["tokens_per_s"], 3) if lf else None,
                "loss_llamafactory": lf["train_loss"] if lf else None,
                "precision_llamafactory": lf["precision"] if lf else None,
                "machine": machine,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
