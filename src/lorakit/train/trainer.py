"""transformers.Trainer plus the few things lorakit needs at every step.

- A NaN or inf loss stops the run before the optimizer applies the bad gradients, so the
  checkpoints already written stay good.
- Real (non-padding) tokens are counted, so tokens/s means work done, not padding.
- Every training log carries tokens/s and a summary of the LoRA weights' norms.
- A full disk during the run is one error line (files.DiskFull) naming what did not fit (a
  checkpoint: with the space it needs), the space free and the last complete checkpoint to resume
  from; a half-written checkpoint folder is removed, those already written stay as they were.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from pathlib import Path

import torch
from transformers import Trainer

from ..errors import LorakitError
from ..files import DiskFull, bytes_on_disk, is_disk_full, space_for
from ..runfolder import CHECKPOINT_MARKER, checkpoint_dir, complete_checkpoints


class TrainingDiverged(LorakitError):
    """The loss became NaN or inf."""

    exit_code = 1


def lora_norms(model) -> dict[str, tuple[float, float, float]]:
    """Per adapted layer: (||A||, ||B||, ||scaling * B·A||), Frobenius norms.

    ||B·A||_F is computed from the r x r Gram matrices, trace((BᵀB)(AAᵀ)), so the full
    out x in update is never built.
    """
    norms = {}
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or "default" not in lora_a:
            continue
        a = lora_a["default"].weight.detach().float()
        b = lora_b["default"].weight.detach().float()
        scaling = module.scaling.get("default", 1.0) if hasattr(module, "scaling") else 1.0
        ba_sq = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0)
        norms[name.removeprefix("base_model.model.")] = (
            float(a.norm()),
            float(b.norm()),
            float(scaling * ba_sq.sqrt()),
        )
    return norms


@contextlib.contextmanager
def _writer_thread_disk_full_said_once():
    """TensorBoard writes its event file from a thread of its own. On a full disk that thread dies
    printing its own traceback, and the next TensorBoard call in the training thread raises the
    same error, which becomes lorakit's one line; so the thread's copy is not printed."""
    previous = threading.excepthook

    def hook(args):
        thread = type(args.thread).__name__ if args.thread is not None else ""
        if thread == "_AsyncWriterThread" and args.exc_value is not None and is_disk_full(args.exc_value):
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


class LorakitTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = True  # compute_loss normalises over the whole accumulated batch
        self.tokens_seen = 0  # real tokens this process trained on since it started
        self._last_log = (time.perf_counter(), 0)
        self.lora_norms_steps = 0  # per-layer norms to TensorBoard every N steps (0 = every log)

    def train(self, *args, **kwargs):
        self._last_log = (time.perf_counter(), self.tokens_seen)
        try:
            # a full disk anywhere in the run (a checkpoint, train_log.jsonl, TensorBoard's event file)
            with space_for(self.args.output_dir), _writer_thread_disk_full_said_once():
                return super().train(*args, **kwargs)
        except BaseException as e:
            self._close_progress_bar()  # so the error line that follows starts a line of its own
            if isinstance(e, DiskFull):
                good = complete_checkpoints(self.args.output_dir)
                hint = (
                    f"the last complete checkpoint is {good[-1]}; free some space and resume with "
                    "resume_from_checkpoint=true"
                    if good
                    else "no checkpoint was written yet"
                )
                raise DiskFull(e.path, e.needed, hint=hint) from None
            raise

    def _close_progress_bar(self) -> None:
        from transformers.trainer_callback import ProgressCallback

        for cb in self.callback_handler.callbacks:
            bar = getattr(cb, "training_bar", None) if isinstance(cb, ProgressCallback) else None
            if bar is not None:
                bar.close()
                cb.training_bar = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Causal-LM loss with logits only where they are needed.

        The output head (vocabulary x hidden) and the softmax over the vocabulary are a large
        share of a small model's step and of its memory; with the prompt masked, about half of
        the positions carry no label. So the model is asked for logits only at the positions
        whose next token is trained (``logits_to_keep`` with indices), and the cross-entropy is
        summed there. The normalisation is the Trainer's: the trained-token count of the whole
        global batch (num_items_in_batch), else this micro-batch's.
        """
        labels = inputs.get("labels")
        if return_outputs or labels is None or not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        mask = inputs.get("attention_mask")
        if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
            # Right padding only: under the causal mask no real token can see a pad token, so the
            # padding mask changes nothing the loss reads, and without it attention takes the
            # plain causal path (no mask tensor built). Pad positions carry no labels.
            inputs.pop("attention_mask")
        next_labels = labels[:, 1:]
        keep = (next_labels != -100).any(dim=0).nonzero().squeeze(1)
        if keep.numel() == 0:  # nothing trained in this micro-batch
            keep = torch.zeros(1, dtype=torch.long, device=labels.device)
        targets = next_labels[:, keep]
        logits = model(**inputs, logits_to_keep=keep).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients over processes
        else:
            loss = (
                loss / (targets != -100).sum().clamp_min(1) / getattr(self, "current_gradient_accumulation_steps", 1)
            )
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        # padding-free (packed) batches carry no attention_mask: every token is real
        self.tokens_seen += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor(0.0 if torch.isfinite(loss).all() else 1.0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank stops together: one rank's NaN poisons the all-reduced gradients too
            bad = bad.to(loss.device)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() > 0:
            step = self.state.global_step + 1
            raise TrainingDiverged(
                f"the training loss became {'nan or inf' if torch.isfinite(loss).all() else float(loss)} "
                f"at step {step}; "
                "the run stopped before applying it"
            )
        return loss

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint save (written in place, marked complete by
        CheckpointMarkerCallback afterwards), with a full disk as one DiskFull line: refused
        beforehand when the last checkpoint's size is not free, else the half-written folder is
        removed (it is no checkpoint, and it holds the space)."""
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = checkpoint_dir(run_dir, self.state.global_step)
        existed, started = folder.exists(), False
        needed = self._checkpoint_bytes(run_dir)
        try:
            with space_for(folder, needed):
                started = True
                super()._save_checkpoint(model, trial)
        except DiskFull as e:
            if started and not existed:
                shutil.rmtree(folder, ignore_errors=True)
            elif started:
                (folder / CHECKPOINT_MARKER).unlink(missing_ok=True)  # partly overwritten: not complete
            raise DiskFull(folder, e.needed) from None  # the free space once it is gone (train() adds the advice)

    def _checkpoint_bytes(self, run_dir: Path) -> int:
        """About what the next checkpoint takes: the last complete one's size, else the trainable
        weights and the optimizer's two moments of each (AdamW; 8-bit ones for the paged 8-bit AdamW)."""
        good = complete_checkpoints(run_dir)
        if good:
            return bytes_on_disk((f.stat().st_size for f in good[-1].rglob("*") if f.is_file()), run_dir)
        trainable = sum(p.nbytes for p in self.model.parameters() if p.requires_grad)
        moments = trainable // 2 if "8bit" in str(self.args.optim) else 2 * trainable
        return bytes_on_disk([trainable, moments], run_dir)

    def _get_train_sampler(self, train_dataset=None):
        """group_by_length with windows sized by the *global* batch, so N processes see the same
        examples per optimizer step as 1 process (transformers sizes them per process)."""
        from transformers.trainer_pt_utils import LengthGroupedSampler

        ds = train_dataset if train_dataset is not None else self.train_dataset
        a = self.args
        if a.train_sampling_strategy == "group_by_length" and ds is not None and hasattr(ds, "__len__"):
            return LengthGroupedSampler(
                a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size,
                lengths=[len(f["input_ids"]) for f in ds],
            )
        return super()._get_train_sampler(train_dataset)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (not eval, not the end-of-training summary)
            now, tokens = time.perf_counter(), self.tokens_seen
            t_prev, tok_prev = self._last_log
            if now > t_prev:
                logs["tokens_per_s"] = round((tokens - tok_prev) * self.args.world_size / (now - t_prev), 1)
            self._last_log = (now, tokens)
            norms = {} if self.is_sharded() else lora_norms(self.model)  # a shard's norms mean nothing
            if norms:
                for i, key in enumerate(("lora_A_norm", "lora_B_norm", "lora_BA_norm")):
                    logs[key] = round(sum(v[i] for v in norms.values()) / len(norms), 6)
                every = self.lora_norms_steps
                if not every or self.state.global_step % every == 0:
                    self._per_layer_norms_to_trackers(norms)
        super().log(logs, start_time)

    def is_sharded(self) -> bool:
        """Whether the weights are split over processes (DeepSpeed ZeRO-3 or FSDP)."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        return bool(getattr(self, "is_fsdp_enabled", False)) or is_deepspeed_zero3_enabled()

    def _per_layer_norms_to_trackers(self, norms) -> None:
        """Per-layer norms to TensorBoard and to the MLflow / W&B runs of report_to."""
        from .trackers import log_scalars, per_layer_scalars

        self._per_layer_norms_to_tensorboard(norms)
        if self.is_world_process_zero():
            log_scalars(self.callback_handler.callbacks, per_layer_scalars(norms), self.state.global_step)

    def _per_layer_norms_to_tensorboard(self, norms) -> None:
        """One scalar per adapted layer and matrix, written with the Trainer's own TensorBoard
        writer (so they sit in the same run as loss and learning rate)."""
        from transformers.integrations import TensorBoardCallback

        if not self.is_world_process_zero():
            return
        tb = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)), None)
        writer = getattr(tb, "tb_writer", None)
        if writer is None:
            return
        step = self.state.global_step
        for layer, (a, b, ba) in norms.items():
            writer.add_scalar(f"lora_norms/{layer}/A", a, step)
            writer.add_scalar(f"lora_norms/{layer}/B", b, step)
            writer.add_scalar(f"lora_norms/{layer}/BA", ba, step)
