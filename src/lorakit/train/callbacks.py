"""Trainer callbacks: the JSONL log, checkpoint markers, loss guards, the live progress line."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..files import append_text, atomic_write_json, atomic_write_text
from ..runfolder import (  # noqa: F401 - re-exported
    CHECKPOINT_MARKER,
    TRAIN_LOG,
    checkpoint_dir,
    checkpoint_step,
    complete_checkpoints,
    incomplete_checkpoints,
    read_train_log,
)


class JsonlLogCallback(TrainerCallback):
    """Appends every log record (train loss, eval loss, learning rate, grad norm) as one JSON
    line to output_dir/train_log.jsonl. Only the main process writes.

    Each record also says where the run is, so readers (the UI) need nothing else: ``step``,
    ``total_steps`` (state.max_steps), ``elapsed_s`` (since this process began training) and
    ``remaining_s``: elapsed / steps done * steps left, counting only the steps this process has
    done, so a resumed run estimates from its own pace (None before its first step)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / TRAIN_LOG
        self.t0 = time.time()
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.time()
        self.start_step = state.global_step  # > 0 when resuming from a checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.time() - self.t0
        total = state.max_steps or None
        done = state.global_step - self.start_step
        remaining = (elapsed / done * max(total - state.global_step, 0)) if total and done > 0 else None
        record = {
            "step": state.global_step,
            "total_steps": total,
            "epoch": round(state.epoch or 0.0, 4),
            "elapsed_s": round(elapsed, 2),
            "remaining_s": round(remaining, 2) if remaining is not None else None,
        }
        for k, v in logs.items():
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)  # JSON has no NaN/inf
            record[k] = v
        append_text(self.path, json.dumps(record) + "\n")  # whole lines only, also on a full disk


# ---- checkpoints -------------------------------------------------------------------------------


class CheckpointMarkerCallback(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it (weights, optimizer,
    scheduler, RNG states, trainer state). transformers writes checkpoint files in place, so a
    process killed mid-save leaves a folder that looks like a checkpoint; resume ignores any
    checkpoint without this marker.

    ``records``: files written into each checkpoint before its marker (the run's config and
    template records), so a checkpoint says what it was trained with on its own, also in a folder
    whose top level still holds an earlier run's finished adapter (overwrite_output_dir)."""

    def __init__(self, records: dict[str, str] | None = None):
        self.records = dict(records or {})

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its part (its RNG state) before the marker
        if not state.is_world_process_zero:
            return
        folder = checkpoint_dir(args.output_dir, state.global_step)
        if folder.is_dir():
            for name, text in self.records.items():
                atomic_write_text(folder / name, text)
            atomic_write_json(folder / CHECKPOINT_MARKER, {"step": state.global_step, "time": time.time()})


# ---- guards and the live line -----------------------------------------------------------------


class LossGuardCallback(TrainerCallback):
    """Warns when the train loss is exactly 0 for several logs in a row (usually every label is
    masked, or labels leak into inputs), and stops the run once the loss reaches stop_at_loss."""

    def __init__(self, zero_loss_warn_steps: int = 3, stop_at_loss: float = 0.0):
        self.zero_loss_warn_steps = zero_loss_warn_steps
        self.stop_at_loss = stop_at_loss
        self.zero_run = 0
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        from ..console import info, warn

        loss = (logs or {}).get("loss")
        if loss is None:
            return
        self.zero_run = self.zero_run + 1 if loss == 0.0 else 0
        if self.zero_run >= self.zero_loss_warn_steps and not self.warned:
            self.warned = True
            warn(
                f"the train loss has been exactly 0 for {self.zero_run} logs in a row (step {state.global_step}); "
                "this usually means no token is left in the loss (check train_on_inputs, cutoff_len and the data)"
            )
        if self.stop_at_loss > 0 and 0 < loss <= self.stop_at_loss:
            info(
                f"train loss {loss:.4f} reached stop_at_loss={self.stop_at_loss} at step {state.global_step}; stopping"
            )
            control.should_training_stop = True


class LiveProgressCallback(ProgressCallback):
    """The Trainer's progress bar (elapsed, ETA) with step loss and tokens/s on it, instead of
    a dict printed per log; one compact line per evaluation."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            post = {"loss": f"{logs['loss']:.4f}"}
            if "tokens_per_s" in logs:
                post["tok/s"] = f"{logs['tokens_per_s']:.0f}"
            self.training_bar.set_postfix(post, refresh=True)
        elif "eval_loss" in logs:
            self.training_bar.write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")
