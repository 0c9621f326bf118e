"""Experiment trackers users already run: TensorBoard, MLflow, Weights & Biases.

The transformers Trainer's own integrations (``report_to``) open the run and send every
training log, so loss, learning rate, grad norm, tokens/s and the mean LoRA norms reach each
tracker. lorakit adds two things:

- per adapted layer, the norms of A, B and scaling·B·A (``lora_norms/<layer>/A|B|BA``), sent to
  the run the Trainer's integration opened, at the training log's step;
- at the end of the run, the manifest's figures (losses, timings, tokens/s, parameter counts,
  eval scores) as summary metrics and its settings as params.
"""

from __future__ import annotations

import importlib.util
import re
import time

from transformers import TrainerCallback

from ..console import warn


def per_layer_scalars(norms: dict[str, tuple[float, float, float]]) -> dict[str, float]:
    """``lora_norms/<layer>/A``, ``.../B``, ``.../BA``: the names TensorBoard shows too."""
    scalars = {}
    for layer, values in norms.items():
        for part, value in zip(("A", "B", "BA"), values):
            scalars[f"lora_norms/{layer}/{part}"] = value
    return scalars


def _mlflow_name(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", key)  # the characters MLflow accepts in a name


def log_scalars(callbacks, scalars: dict[str, float], step: int) -> None:
    """Send scalars to the MLflow and W&B runs the Trainer's integrations (in ``callbacks``)
    opened; a tracker that is not in use, or whose run is not open, is skipped."""
    from transformers.integrations import MLflowCallback, WandbCallback

    for cb in callbacks:
        if isinstance(cb, MLflowCallback) and cb._initialized and cb._ml_flow.active_run() is not None:
            metrics = {_mlflow_name(k): v for k, v in scalars.items()}
            if getattr(cb, "_async_log", False):
                cb._ml_flow.log_metrics(metrics, step=step, synchronous=False)
            else:
                cb._ml_flow.log_metrics(metrics, step=step)
        elif isinstance(cb, WandbCallback) and cb._wandb is not None and cb._wandb.run is not None:
            # train/global_step is the x axis WandbCallback defines for every metric
            cb._wandb.log({**scalars, "train/global_step": step})


def _flatten(value, prefix: str, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}/{k}" if prefix else str(k), out)
    elif value is not None:
        out[prefix] = value


# manifest sections whose numbers are results (metrics); the rest are the run's settings (params)
_RESULT_SECTIONS = ("training", "parameters", "eval", "verification")


def manifest_figures(manifest: dict) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, params) from a manifest, named by their path in it: ``training/train_loss``,
    ``parameters/trainable``, ``eval/scores/<model>/<set>/<metric>``; params such as
    ``base_model``, ``lora/r``, ``data/sha256``. Library versions and timestamps are left out."""
    flat: dict = {}
    for key, value in manifest.items():
        if key not in ("libraries", "created"):
            _flatten(value, key, flat)
    metrics, params = {}, {}
    for key, value in flat.items():
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if is_number and key.split("/", 1)[0] in _RESULT_SECTIONS:
            metrics[key] = float(value)
        else:
            params[key] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return metrics, params


class TrackerRuns(TrainerCallback):
    """Keeps the MLflow run the Trainer logged to open after training.

    MLflowCallback ends the run it started at the end of ``train()``; an evaluation after that
    (lorakit's final eval loss) would then start a stray run of its own. So the run is reopened
    at once, and ``send_summary`` ends it after the manifest's figures are in.
    """

    def __init__(self):
        self.mlflow_run_id: str | None = None
        self.reopened = False

    @staticmethod
    def _mlflow(args):
        if "mlflow" not in (args.report_to or []) or importlib.util.find_spec("mlflow") is None:
            return None
        import mlflow

        return mlflow

    def on_train_begin(self, args, state, control, **kwargs):
        mlflow = self._mlflow(args)
        if mlflow is not None and state.is_world_process_zero:  # after MLflowCallback started its run
            run = mlflow.active_run()
            self.mlflow_run_id = run.info.run_id if run is not None else None

    def on_train_end(self, args, state, control, **kwargs):
        mlflow = self._mlflow(args)
        if mlflow is not None and self.mlflow_run_id and mlflow.active_run() is None:
            mlflow.start_run(run_id=self.mlflow_run_id)
            self.reopened = True


def send_summary(manifest: dict, report_to: list[str], runs: TrackerRuns | None = None) -> None:
    """The manifest's figures to each tracker in ``report_to``, after training: MLflow gets
    them as metrics and params of the run the Trainer logged to (``lorakit/`` prefix on params
    keeps them apart from the TrainingArguments the integration logged); W&B as the run's
    summary and config, then the run is finished. TensorBoard needs nothing: the same
    figures are in the manifest next to its event files. A tracker that fails here only warns:
    the adapter is already saved."""
    metrics, params = manifest_figures(manifest)
    if "mlflow" in report_to:
        try:
            _mlflow_summary(metrics, params, runs)
        except Exception as e:
            warn(f"report_to: could not send the summary to mlflow ({type(e).__name__}: {e})")
    if "wandb" in report_to:
        try:
            _wandb_summary(metrics, params)
        except Exception as e:
            warn(f"report_to: could not send the summary to wandb ({type(e).__name__}: {e})")


def _mlflow_summary(metrics: dict[str, float], params: dict[str, str], runs: TrackerRuns | None) -> None:
    import mlflow

    run_id = runs.mlflow_run_id if runs is not None else None
    if run_id is None:
        run = mlflow.active_run() or mlflow.last_active_run()
        if run is None:
            return
        run_id = run.info.run_id
    client, now = mlflow.MlflowClient(), int(time.time() * 1000)
    limit = mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
    try:
        _log_to_mlflow(client, run_id, metrics, params, now, limit)
    finally:
        active = mlflow.active_run()
        if runs is not None and runs.reopened and active is not None and active.info.run_id == run_id:
            mlflow.end_run()  # the run TrackerRuns kept open


def _log_to_mlflow(client, run_id, metrics, params, now, limit) -> None:
    from mlflow.entities import Metric, Param

    client.log_batch(run_id, metrics=[Metric(_mlflow_name(k), v, now, 0) for k, v in metrics.items()])
    # separately: MLflow refuses to change a param (a run resumed through MLFLOW_RUN_ID)
    client.log_batch(run_id, params=[Param(_mlflow_name(f"lorakit/{k}"), v[:limit]) for k, v in params.items()])


def _wandb_summary(metrics: dict[str, float], params: dict[str, str]) -> None:
    import wandb

    run = wandb.run
    if run is None:
        return
    run.summary.update(metrics)
    run.config.update({f"lorakit/{k}": v for k, v in params.items()}, allow_val_change=True)
    run.finish()
