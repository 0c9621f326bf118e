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
from .infer.generate import GenerationParams, Generator
from .train.recipe import train


def demo_config(out: Path, steps: int, base_model: str) -> TrainConfig:
    return TrainConfig(
        base_model=base_model, data_path=str(out / "data" / "train.jsonl"),
        output_dir=str(out / "adapter"), overwrite_output_dir=True,
        prompt_template_name="alpaca", cutoff_len=128,
        lora_r=8, lora_alpha=16, lora_dropout=0.05, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        batch_size=8, micro_batch_size=8, max_steps=steps, learning_rate=1e-3,
        lr_scheduler_type="cosine", warmup_steps=5, logging_steps=5, save_steps=max(steps, 1),
        save_total_limit=1, seed=0)


def score(answers: list[str]) -> tuple[int, int]:
    items = heldout_items()
    return sum(item.correct(a) for item, a in zip(items, answers)), len(items)


def run_demo(out: str | Path = "lorakit-demo", steps: int = 60, base_model: str = "smollm2-135m",
             show: int = 6) -> dict:
    t0 = time.time()
    out = Path(out)
    write_demo_data(out / "data")
    cfg = demo_config(out, steps, base_model)
    (out / "demo.yaml").write_text(dump_config(cfg), encoding="utf-8")
    info(f"demo data written to {out / 'data'}; config {out / 'demo.yaml'} (rerun with `lorakit train {out / 'demo.yaml'}`)")

    questions = [i.question for i in heldout_items()]
    params = GenerationParams(max_new_tokens=40)

    info("training the adapter ...")
    manifest = train(cfg)

    info(f"answering {len(questions)} held-out questions with the base model and with the adapter ...")
    gen = Generator(base=base_model, adapter=cfg.output_dir)
    base_answers = gen.generate_batch(questions, params=params, use_adapter=False)
    tuned_answers = gen.generate_batch(questions, params=params, use_adapter=True)
    base_ok, n = score(base_answers)
    tuned_ok, _ = score(tuned_answers)

    table = Table(title="Held-out questions (never seen in training)", show_lines=True)
    table.add_column("question")
    table.add_column("base model")
    table.add_column("with adapter")
    items = heldout_items()
    for i in list(range(0, len(items), max(len(items) // show, 1)))[:show]:
        mark = lambda ok: "[green]✓[/]" if ok else "[red]✗[/]"  # noqa: E731
        table.add_row(items[i].question, f"{mark(items[i].correct(base_answers[i]))} {base_answers[i][:120]}",
                      f"{mark(items[i].correct(tuned_answers[i]))} {tuned_answers[i][:120]}")
    err_console.print(table)
    result = {"heldout": n, "base_correct": base_ok, "adapter_correct": tuned_ok,
              "base_score": base_ok / n, "adapter_score": tuned_ok / n,
              "train_loss": manifest["training"]["train_loss"], "steps": manifest["training"]["global_steps"],
              "wall_s": round(time.time() - t0, 1), "adapter": cfg.output_dir,
              "threads": torch.get_num_threads()}
    return result
