"""A training run started from the page: the form's values become a validated TrainConfig,
written as YAML into the run's folder, and a `lorakit train` process (its own process group)
runs it, so the same run can be repeated from the command line. The page follows it through
the file the trainer writes anyway: ``train_log.jsonl``, whose records carry the step, the total,
the loss, tokens/s and the time left (JsonlLogCallback); before the first record, the run's last
``lorakit ...`` status line (loading data, the model) from its captured output.

Stop sends SIGINT (the trainer stops with KeyboardInterrupt between steps; SIGTERM where SIGINT
is ignored), then SIGTERM and SIGKILL if it does not end in time. Whatever ends it, the
checkpoints already written stay: a checkpoint only counts once its completion marker is
written (CheckpointMarkerCallback), and `resume_from_checkpoint=true` continues from the last complete one.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from ..config import TrainConfig, _format_validation_error, dump_config
from ..errors import ConfigError, LorakitError
from ..files import atomic_write_text
from ..runfolder import MANIFEST, complete_checkpoints, read_train_log
from .workdir import UI_CONFIG, UI_LOG, Workdir, safe_stem

# The TrainConfig keys the Train tab sets; everything else keeps TrainConfig's default.
FORM_KEYS = (
    "base_model",
    "prompt_template_name",
    "cutoff_len",
    "val_set_size",
    "train_on_inputs",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "num_epochs",
    "max_steps",
    "batch_size",
    "micro_batch_size",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "seed",
    "precision",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
)
# Where the page differs from TrainConfig's defaults: a loss point per step for the live chart,
# a checkpoint often enough that Stop keeps something, and evaluation as often (with validation
# data, save_steps must be a multiple of eval_steps).
UI_DEFAULTS = {"logging_steps": 1, "save_steps": 50, "eval_steps": 50}
STOP_GRACE_S = 20.0  # SIGINT, then SIGTERM after this, then SIGKILL after as long again


def form_defaults() -> dict:
    """The form's starting values: TrainConfig's defaults (rank 8, alpha 16, lr 3e-4, ...)."""
    values = {}
    for key in FORM_KEYS:
        f = TrainConfig.model_fields[key]
        values[key] = f.default_factory() if f.default_factory else f.default
    return {**values, **UI_DEFAULTS}


def values_from_config(config: dict) -> dict:
    """A recorded config (lorakit_config.yaml or train.yaml) -> form values ("copy parameters from")."""
    values = form_defaults()
    values.update({k: config[k] for k in FORM_KEYS if k in config})
    return values


def build_config(values: dict, data_path: str | Path, output_dir: str | Path) -> TrainConfig:
    """Form values -> a validated TrainConfig. A bad value raises ConfigError in one line that
    names the key (the form shows each key beside its field)."""
    unknown = set(values) - set(FORM_KEYS)
    if unknown:
        raise ConfigError(f"settings: unknown keys {', '.join(sorted(unknown))}")
    data = dict(values)
    for key in (
        "cutoff_len",
        "lora_r",
        "max_steps",
        "batch_size",
        "micro_batch_size",
        "warmup_steps",
        "seed",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
    ):
        v = data.get(key)
        if isinstance(v, float) and v.is_integer():  # gr.Number gives floats
            data[key] = int(v)
    if data.get("max_steps") in (0, None):
        data["max_steps"] = -1  # 0 on the form: train by epochs
    if isinstance(data.get("val_set_size"), float) and data["val_set_size"].is_integer():
        data["val_set_size"] = int(data["val_set_size"])
    data.update(data_path=str(data_path), output_dir=str(output_dir))
    try:
        return TrainConfig(**data).check_for_training("settings")
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, "settings")) from None


def default_run_name(data_path: str | Path) -> str:
    stem = "demo" if Path(data_path).parent.name == "demo" else safe_stem(Path(data_path).stem, limit=50)
    return f"lora-{stem}-{datetime.now():%m%d-%H%M%S}"


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def loss_points(records: list[dict]) -> list[dict]:
    """Rows for the loss chart: step, loss, series (train / eval)."""
    rows = []
    for r in records:
        for key, series in (("loss", "train"), ("eval_loss", "eval")):
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v) and "step" in r:
                rows.append({"step": r["step"], "loss": float(v), "series": series})
    return rows


def _tail(path: Path, size: int = 16384) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def output_lines(text: str) -> list[str]:
    """The lines a terminal would show: of a progress bar's redraws (\\r) only the last."""
    lines = []
    for raw in text.split("\n"):
        parts = [p.rstrip() for p in raw.split("\r") if p.strip()]
        if parts:
            lines.append(parts[-1])
    return lines


def error_summary(log_text: str, max_lines: int = 15) -> str:
    """What went wrong: lorakit's one `error:` line, else the end of the output (a traceback)."""
    lines = output_lines(log_text)
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1]
    return "\n".join(lines[-max_lines:])


@dataclass
class RunStatus:
    state: str  # starting | training | stopping | done | stopped | failed
    name: str
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    phase: str = ""  # the last status line of the run (data, model, ...) before training starts
    message: str = ""  # markdown for the page: done / stopped / failed
    points: list[dict] = field(default_factory=list)
    log_lines: int = 0  # train_log.jsonl records so far (the page redraws the chart when it grows)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "stopped", "failed")

    def progress_line(self) -> str:
        if self.state == "starting" and self.step is None:
            return f"starting ({format_duration(self.elapsed_s)}): {self.phase or 'loading'}"
        parts = [f"step {self.step if self.step is not None else 0}/{self.total or '?'}"]
        parts.append(f"loss {self.loss:.4f}" if self.loss is not None else "loss -")
        parts.append(f"{self.tokens_per_s:,.0f} tokens/s" if self.tokens_per_s else "- tokens/s")
        parts.append(f"elapsed {format_duration(self.elapsed_s)}")
        if not self.finished:
            parts.append(f"time left {format_duration(self.eta_s) if self.eta_s is not None else 'estimating'}")
        return " · ".join(parts)


def stop_signal() -> int:
    """SIGINT (the trainer stops between steps), or SIGTERM where SIGINT is ignored in this
    process: children inherit an ignored SIGINT (a page started with `&` or nohup), and would
    not stop on it."""
    return signal.SIGTERM if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else signal.SIGINT


class TrainingRun:
    """One `lorakit train` process started by the page."""

    def __init__(
        self,
        name: str,
        output_dir: Path,
        config_path: Path,
        overrides: list[str],
        total_steps: int | None = None,
        cwd: Path | None = None,
    ):
        self.name = name
        self.output_dir = Path(output_dir)
        self.config_path = Path(config_path)
        self.overrides = list(overrides)
        self.log_path = self.output_dir / UI_LOG
        self.total = total_steps if total_steps and total_steps > 0 else None
        self.cwd = cwd or self.output_dir
        self.process: subprocess.Popen | None = None
        self.started = self.ended = None
        self.stop_requested = False
        self._log_file = None
        self.records_before = 0  # train_log.jsonl records of earlier runs in this folder (a resume)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "lorakit.cli", "train", str(self.config_path), *self.overrides]

    @property
    def command_line(self) -> str:
        """The command that repeats this run from a terminal."""
        return shlex.join(["lorakit", "train", str(self.config_path), *self.overrides])

    def start(self) -> TrainingRun:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.records_before = len(read_train_log(self.output_dir))
        self._log_file = self.log_path.open("wb")
        self._log_file.write(f"$ {self.command_line}\n".encode())
        self._log_file.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        kwargs: dict = (
            {"start_new_session": True}
            if os.name == "posix"
            else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        )  # type: ignore[attr-defined]
        self.started = time.time()
        self.process = subprocess.Popen(
            self.argv,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(self.cwd),
            env=env,
            **kwargs,
        )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal(self, sig) -> None:
        if not self.running:
            return
        try:
            if os.name == "posix":
                os.killpg(self.process.pid, sig)
            else:  # Windows: CTRL_BREAK_EVENT reaches the process group
                self.process.send_signal(signal.CTRL_BREAK_EVENT if sig == signal.SIGINT else sig)  # type: ignore[attr-defined]
        except (ProcessLookupError, PermissionError, OSError):
            pass

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Ask the run to stop; escalate in the background if it does not end in time."""
        if not self.running:
            return
        self.stop_requested = True
        self._signal(stop_signal())

        def escalate():
            for sig in (signal.SIGTERM, getattr(signal, "SIGKILL", signal.SIGTERM)):
                try:
                    self.process.wait(grace_s)
                    return
                except subprocess.TimeoutExpired:
                    self._signal(sig)

        threading.Thread(target=escalate, daemon=True, name=f"stop-{self.name}").start()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.process.wait(timeout) if self.process else None
        except subprocess.TimeoutExpired:
            return None

    # ---- what the page shows ------------------------------------------------------------------
    def status(self) -> RunStatus:
        now = time.time()
        rc = self.process.poll() if self.process else None
        if rc is not None and self.ended is None:
            self.ended = now
            if self._log_file:
                self._log_file.close()
        status = RunStatus(
            state="starting", name=self.name, elapsed_s=((self.ended or now) - self.started) if self.started else 0.0
        )
        records = read_train_log(self.output_dir)
        status.points = loss_points(records)
        status.log_lines = len(records)
        records = records[self.records_before :]  # this process's: a resumed run starts anew
        train = [r for r in records if isinstance(r.get("loss"), (int, float))]
        if train:
            status.loss = float(train[-1]["loss"])
            speeds = [r["tokens_per_s"] for r in train[-5:] if isinstance(r.get("tokens_per_s"), (int, float))]
            status.tokens_per_s = sum(speeds) / len(speeds) if speeds else None
        placed = [r for r in records if isinstance(r.get("step"), int)]
        if placed:  # where the run is: the last record's step, total and time left (JsonlLogCallback)
            last = placed[-1]
            status.step = last["step"]
            if isinstance(last.get("total_steps"), int) and last["total_steps"] > 0:
                self.total = last["total_steps"]
            remaining = last.get("remaining_s")
            status.eta_s = float(remaining) if isinstance(remaining, (int, float)) else None
            status.state = "training"
        status.total = self.total
        tail = _tail(self.log_path)
        lines = [ln for ln in output_lines(tail) if ln.startswith(("lorakit ", "warning "))]
        status.phase = lines[-1] if lines else ""

        if rc is None:
            if self.stop_requested:
                status.state = "stopping"
                status.message = "Stopping: the run ends at the next step; its complete checkpoints are kept."
            return status
        manifest = self.output_dir / MANIFEST
        if rc == 0 and manifest.is_file():
            status.state = "done"
            status.message = self._done_message(manifest, status)
        elif self.stop_requested:
            status.state = "stopped"
            status.message = self._stopped_message(status)
        else:
            status.state = "failed"
            summary = error_summary(_tail(self.log_path, 65536))
            status.message = (
                f"**Training failed** (exit code {rc}).\n\n```\n{summary}\n```\n\nThe whole output: `{self.log_path}`"
            )
        return status

    def _done_message(self, manifest_path: Path, status: RunStatus) -> str:
        try:
            t = json.loads(manifest_path.read_text(encoding="utf-8")).get("training", {})
        except (OSError, ValueError):
            t = {}
        loss = f"final train loss {status.loss:.4f}" if status.loss is not None else ""
        status.step = t.get("global_steps", status.step)
        status.tokens_per_s = t.get("tokens_per_s") or status.tokens_per_s
        return (
            f"**Done**: {t.get('global_steps', '?')} steps in {t.get('wall_s', '?')} s of training "
            f"({format_duration(status.elapsed_s)} in all), {loss}"
            + (f", eval loss {t['eval_loss']:.4f}" if isinstance(t.get("eval_loss"), (int, float)) else "")
            + f". Adapter **{self.name}** verified and saved in `{self.output_dir}`: "
            "talk to it on the Chat tab, or set it beside the base model on the Compare tab."
        )

    def _stopped_message(self, status: RunStatus) -> str:
        kept = complete_checkpoints(self.output_dir)
        where = (
            f"Kept: **{kept[-1].name}** (the last complete checkpoint). Chat with it as "
            f"*{self.name} @ {kept[-1].name}*, or continue: pick *{self.name}* under "
            "'Copy parameters from', tick 'Resume from its last checkpoint' and Start "
            f"(or `{shlex.join(['lorakit', 'train', str(self.config_path), 'resume_from_checkpoint=true'])}`)."
            if kept
            else "No checkpoint had been written yet (one is written every `save_steps` steps), "
            "so nothing of this run is kept."
        )
        return f"**Stopped** at step {status.step or 0}. {where}"


def prepare_run(
    workdir: Workdir, values: dict, data_path: str | Path, name: str = "", resume: bool = False
) -> TrainingRun:
    """Validate the form, claim the run's folder WORKDIR/adapters/NAME (a name already used there
    is refused: a new run never writes into an existing folder; only a resume continues its own),
    write the run's config (train.yaml) and return the run, not yet started. Start runs through
    RunManager.launch, which does all this under its lock."""
    name = name if (name or "").strip() else default_run_name(data_path)
    output_dir = workdir.path_for(workdir.adapters_dir, name, "adapter name")
    name = output_dir.name
    overrides: list[str] = []
    if resume:
        if not complete_checkpoints(output_dir):
            raise LorakitError(f"resume: {name} has no complete checkpoint to resume from")
        overrides.append("resume_from_checkpoint=true")
    elif (output_dir / MANIFEST).is_file() or any(output_dir.glob("checkpoint-*")):
        raise LorakitError(
            f"adapter name: {name} already holds a trained adapter or checkpoints; choose "
            "another name, or pick it under 'Copy parameters from' and tick 'Resume'"
        )
    elif os.path.lexists(output_dir):
        raise LorakitError(
            f"adapter name: {name} is already in use ({output_dir} exists); choose another name "
            "(or delete that folder)"
        )
    cfg = build_config(values, data_path, output_dir)  # before the folder: a bad value leaves nothing
    if not resume:
        try:
            output_dir.mkdir()  # atomic: of two starts with one name (other processes too), one gets it
        except FileExistsError:
            raise LorakitError(f"adapter name: {name} is already in use ({output_dir} exists)") from None
    config_path = output_dir / UI_CONFIG
    atomic_write_text(config_path, dump_config(cfg))
    return TrainingRun(
        name,
        output_dir,
        config_path,
        overrides,
        total_steps=cfg.max_steps if cfg.max_steps > 0 else None,
        cwd=workdir.root,
    )


class RunManager:
    """One training run at a time in this process, whichever browser session (or manager) starts
    it: the check "nothing running" and the start happen under one lock of the process, so two
    Starts at the same moment cannot both pass the check; the second is refused with a message.
    The process outlives page reloads, not the server."""

    _lock = threading.Lock()  # class-wide: every session and every RunManager of the process
    _active: TrainingRun | None = None  # the run this process started last (by any manager)

    def __init__(self):
        self.run: TrainingRun | None = None

    @classmethod
    def _refuse_if_busy(cls) -> None:
        active = cls._active
        if active is not None and active.running:
            raise LorakitError(f"a run is in progress ({active.name}); stop it or wait until it ends")

    def start(self, run: TrainingRun) -> TrainingRun:
        """Start a prepared run, refused while another is in progress."""
        return self.launch(lambda: run)

    def launch(self, prepare: Callable[[], TrainingRun]) -> TrainingRun:
        """Refuse while a run is in progress; else prepare() (validate, claim the folder, write
        the config: prepare_run) and start it, all under the lock."""
        with RunManager._lock:
            self._refuse_if_busy()
            run = prepare()
            run.start()
            RunManager._active = self.run = run
            return run

    def stop(self) -> bool:
        run = self.run
        if run is None or not run.running:
            return False
        run.stop()
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop a run in progress when the server ends (its complete checkpoints stay)."""
        run = self.run
        if run is not None and run.running:
            run.stop(grace_s=timeout)
            run.wait(3 * timeout)
