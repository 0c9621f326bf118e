"""The main job: fine-tune the default model on the bundled persona data and measure, on
held-out questions worded differently from training, what the adapter learned."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.table import Table

from .config import TrainConfig, dump_config
from .console import err_console, info
from .data.demo import heldout_items, write_demo_data
from .eval.runner import evaluate
from .files import atomic_write_text
from .train.recipe import train


def demo_config(out: Path, steps: int, base_model: str) -> TrainConfig:
    return TrainConfig(
        base_model=base_model,
        data_path=str(out / "data" / "train.jsonl"),
        output_dir=str(out / "adapter"),
        overwrite_output_dir=True,
        prompt_template_name="alpaca",
        cutoff_len=128,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        batch_size=8,
        micro_batch_size=8,
        max_steps=steps,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        logging_steps=5,
        save_steps=max(steps, 1),
        save_total_limit=1,
        seed=0,
    )


def run_demo(
    out: str | Path = "lorakit-demo", steps: int = 60, base_model: str = "smollm2-135m", show: int = 6
) -> dict:
    t0 = time.time()
    out = Path(out)
    write_demo_data(out / "data")
    cfg = demo_config(out, steps, base_model)
    atomic_write_text(out / "demo.yaml", dump_config(cfg))
    info(
        f"demo data written to {out / 'data'}; config {out / 'demo.yaml'} "
        f"(rerun with `lorakit train {out / 'demo.yaml'}`)"
    )

    info("training the adapter ...")
    manifest = train(cfg)

    # The before/after score is lorakit's evaluator: held-out answers must name the persona,
    # which is its "contains" metric (heldout.jsonl stores the expected name as the answer).
    info(f"answering {len(heldout_items())} held-out questions with the base model and with the adapter ...")
    report = evaluate(
        base_model,
        [cfg.output_dir],
        [str(out / "data" / "heldout.jsonl")],
        out / "eval",
        metrics=["contains"],
        max_new_tokens=40,
        samples_per_set=len(heldout_items()),
    )
    adapter_name = report["models"][1]["name"]
    base_score = report["scores"]["base"]["heldout"]["contains"] / 100
    tuned_score = report["scores"][adapter_name]["heldout"]["contains"] / 100
    n = report["datasets"][0]["examples"]

    table = Table(title="Held-out questions (never seen in training)", show_lines=True)
    table.add_column("question")
    table.add_column("base model")
    table.add_column("with adapter")
    mark = {True: "[green]✓[/]", False: "[red]✗[/]"}
    samples = report["samples"]["heldout"]
    for sample in samples[:: max(len(samples) // show, 1)][:show]:  # identity and creator questions
        expected = sample["reference"].lower()
        base_answer, tuned_answer = sample["answers"]["base"], sample["answers"][adapter_name]
        table.add_row(
            sample["prompt"],
            f"{mark[expected in base_answer.lower()]} {base_answer[:120]}",
            f"{mark[expected in tuned_answer.lower()]} {tuned_answer[:120]}",
        )
    err_console.print(table)
    result = {
        "heldout": n,
        "base_correct": round(base_score * n),
        "adapter_correct": round(tuned_score * n),
        "base_score": base_score,
        "adapter_score": tuned_score,
        "train_loss": manifest["training"]["train_loss"],
        "steps": manifest["training"]["global_steps"],
        "wall_s": round(time.time() - t0, 1),
        "adapter": cfg.output_dir,
        "report": str(out / "eval" / "report.html"),
        "threads": torch.get_num_threads(),
    }
    return result
