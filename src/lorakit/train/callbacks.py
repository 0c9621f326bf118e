"""Trainer callbacks: the JSONL training log lorakit writes into output_dir."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

TRAIN_LOG = "train_log.jsonl"


class JsonlLogCallback(TrainerCallback):
    """Appends every log record (train loss, eval loss, learning rate, grad norm) as one JSON
    line to output_dir/train_log.jsonl. Only the main process writes."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / TRAIN_LOG
        self.t0 = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                  "elapsed_s": round(time.time() - self.t0, 2)}
        for k, v in logs.items():
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)  # JSON has no NaN/inf
            record[k] = v
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_train_log(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / TRAIN_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
