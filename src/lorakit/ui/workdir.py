"""The folder `lorakit ui` works in, and what is in it.

Layout (every folder is made on first use)::

    WORKDIR/data/           datasets: uploads are checked and copied here; data/demo/ holds the demo data
    WORKDIR/adapters/NAME/  one training run each: its output_dir (adapter, checkpoints, train_log.jsonl,
                            manifest.json) plus train.yaml (the config the page started) and train.log
    WORKDIR/models/NAME/    local base models (Hugging Face folders) the page offers besides the aliases
    WORKDIR/merged/NAME/    merged models written by the Models tab (usable as base models too)
    WORKDIR/eval/NAME/      evaluation reports written by the Evaluate tab
    WORKDIR/exports/NAME/   exports written by the Export tab

Every name the page writes there goes through Workdir.path_for (check_name, then where it resolves).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..data.demo import write_demo_data
from ..data.loader import load_examples
from ..errors import DataError, LorakitError
from ..models.registry import ALIASES, DEFAULT_BASE_MODEL, list_cached
from ..runfolder import (  # noqa: F401
    ADAPTER_CONFIG,
    CHECKPOINT_MARKER,
    CONFIG_RECORD,
    MANIFEST,
    TRAIN_LOG,
    complete_checkpoints,
    read_config_record,
    read_manifest,
    read_train_log,
)

DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet")
# Dropdown values for the demo data (written into data/demo/ when first chosen).
DEMO_TRAIN = "demo:train"
DEMO_HELDOUT = "demo:heldout"
DEMO_LABELS = {
    DEMO_TRAIN: "demo: the Marlowe persona (built in, 120 records)",
    DEMO_HELDOUT: "demo: held-out persona questions (built in, 20 records)",
}
UI_CONFIG = "train.yaml"  # the config the page wrote; `lorakit train` repeats the run from it
UI_LOG = "train.log"  # the run's stdout and stderr
NAME_MAX = 80
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MB = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 512 * MB  # `lorakit ui --max-upload-mb`


def safe_stem(text: str, fallback: str = "data", limit: int = NAME_MAX - 20) -> str:
    """A name check_name accepts, made from any text (an upload's file name, an adapter key):
    other characters become '_', runs of dots one dot; room is left for a suffix."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text or "")
    stem = re.sub(r"\.{2,}", ".", stem).strip("._-")[:limit].rstrip("._-")
    return stem or fallback


def check_name(name: str, what: str = "adapter name") -> str:
    """A name typed on the page that becomes one file or folder of the workdir (a run, an export, a
    merged model): one path component of letters, digits, '.', '_', '-', starting with a letter or
    digit, at most NAME_MAX characters. Anything else is refused in one line that says why (a
    path separator, '..', an absolute path, a leading dot, a control character, ...); surrounding
    spaces are dropped. Workdir.path_for also checks where the name resolves."""
    name = (name or "").strip()
    shown = repr(name) if len(name) <= NAME_MAX else repr(name[:NAME_MAX] + "...")
    if not name:
        why = "is empty"
    elif any(ord(c) < 32 or c == "\x7f" for c in name):
        why = "holds a control character"
    elif name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        why = "is an absolute path; give a name, not a path"
    elif "/" in name or "\\" in name:
        why = "holds a path separator; give a name, not a path"
    elif ".." in name:
        why = "holds '..'"
    elif name.startswith("."):
        why = "starts with a dot (a hidden file)"
    elif len(name) > NAME_MAX:
        why = f"is longer than {NAME_MAX} characters"
    elif not _NAME.match(name):
        why = "is not a usable folder name (letters, digits, '.', '_', '-'; starting with a letter or digit)"
    else:
        return name
    raise LorakitError(f"{what}: {shown} {why}")


@dataclass
class AdapterInfo:
    """A training run folder under adapters/ (or a plain peft adapter copied there)."""

    name: str
    folder: Path
    manifest: dict | None = None
    config: dict | None = None  # the resolved config the run recorded (lorakit_config.yaml)
    checkpoints: list[Path] = field(default_factory=list)  # complete ones, oldest first

    def settings(self) -> dict:
        """The run's config: the one it recorded, else the one the page wrote for it ({} if none)."""
        return self.config or read_config_record(self.folder, UI_CONFIG) or {}

    @property
    def trained(self) -> bool:
        """A finished, verified adapter (the manifest is written last) or a plain peft adapter."""
        return (self.folder / ADAPTER_CONFIG).is_file() and (self.manifest is not None or self.config is None)

    @property
    def usable(self) -> Path | None:
        """The folder to load for chat/compare/merge: the adapter, else the last complete checkpoint."""
        if self.trained:
            return self.folder
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def key(self) -> str:
        """The dropdown value: the name, or NAME/checkpoint-N for an unfinished run."""
        usable = self.usable
        return self.name if usable is None or usable == self.folder else f"{self.name}/{usable.name}"

    @property
    def label(self) -> str:
        usable = self.usable
        if usable is not None and usable != self.folder:
            return f"{self.name} @ {usable.name} (unfinished run)"
        return self.name

    def summary_row(self) -> list:
        """Name, status, base, data, LoRA, steps, final train loss, eval loss, created."""
        m, c = self.manifest or {}, self.config or {}
        t, lora, data = m.get("training") or {}, m.get("lora") or {}, m.get("data") or {}
        status = (
            "trained"
            if self.manifest
            else (
                "peft adapter"
                if self.trained
                else (f"unfinished ({self.checkpoints[-1].name})" if self.checkpoints else "no adapter yet")
            )
        )
        targets = lora.get("target_modules", c.get("lora_target_modules"))
        data_path = data.get("path") or c.get("data_path") or ""
        records = f" ({data['records']} records)" if data.get("records") else ""
        losses = [r["loss"] for r in read_train_log(self.folder) if isinstance(r.get("loss"), (int, float))]
        final = losses[-1] if losses else None
        base = str(m.get("base_model") or c.get("base_model") or "")
        return [
            self.name,
            status,
            Path(base).name if "/" in base and Path(base).exists() else base,
            (Path(data_path).name + records) if data_path else "",
            f"r={lora.get('r', c.get('lora_r', '?'))} alpha={lora.get('alpha', c.get('lora_alpha', '?'))} "
            f"{_targets_text(targets)}",
            t.get("global_steps", ""),
            _round(final),
            _round(t.get("eval_loss")),
            (m.get("created") or "")[:19].replace("T", " "),
        ]


SUMMARY_HEADERS = [
    "adapter",
    "status",
    "base model",
    "data",
    "LoRA",
    "steps",
    "final train loss",
    "eval loss",
    "created",
]


def _targets_text(targets) -> str:
    if isinstance(targets, list):
        return ",".join(targets)
    return str(targets or "")


def _mb(n: int) -> str:
    return f"{n / MB:g} MB"


def upload_limit(workdir: Workdir) -> str:
    """The upload limit as the page shows it ("512 MB")."""
    return _mb(workdir.max_upload_bytes)


def _round(v):
    return round(v, 4) if isinstance(v, (int, float)) else ""


class Workdir:
    def __init__(self, root: str | Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    data_dir = property(lambda self: self._dir("data"))
    adapters_dir = property(lambda self: self._dir("adapters"))
    models_dir = property(lambda self: self._dir("models"))
    merged_dir = property(lambda self: self._dir("merged"))
    eval_dir = property(lambda self: self._dir("eval"))
    exports_dir = property(lambda self: self._dir("exports"))

    def path_for(self, folder: Path, name: str, what: str) -> Path:
        """WORKDIR/.../NAME for a name typed on the page (check_name), refused unless it resolves,
        symbolic links followed, to a direct child of ``folder`` inside the workdir: a link
        planted there cannot send a write elsewhere. Every name of the page that becomes a file
        or folder goes through here."""
        name = check_name(name, what)
        folder = Path(folder)
        path = folder / name
        if not self.inside(folder, self.root):
            raise LorakitError(f"{what}: {folder} is outside the workdir {self.root}")
        if path.resolve().parent != folder.resolve():
            raise LorakitError(f"{what}: {path} leads outside {folder} (a symbolic link)")
        return path

    @staticmethod
    def inside(path: Path, folder: Path) -> bool:
        """``path`` is ``folder`` or below it, both with their symbolic links resolved."""
        path, folder = Path(path).resolve(), Path(folder).resolve()
        return path == folder or folder in path.parents

    # ---- datasets ---------------------------------------------------------------------------
    def datasets(self) -> list[Path]:
        """Data files under data/, except the demo data (offered by its own choices)."""
        demo = self.data_dir / "demo"
        return sorted(
            p
            for p in self.data_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and demo not in p.parents
        )

    def dataset_choices(self, heldout: bool = False) -> list[tuple[str, str]]:
        """(label, value) pairs: the demo data first, then data/ files by their relative path."""
        demo = [DEMO_TRAIN, DEMO_HELDOUT] if heldout else [DEMO_TRAIN]
        return [(DEMO_LABELS[d], d) for d in demo] + [
            (str(p.relative_to(self.data_dir)), str(p)) for p in self.datasets()
        ]

    def resolve_dataset(self, value: str) -> Path:
        """A dropdown value -> the data file (the demo data is written on first use)."""
        if not value:
            raise LorakitError("dataset: choose one (or upload a file)")
        if value in (DEMO_TRAIN, DEMO_HELDOUT):
            folder = self.data_dir / "demo"
            train, held = folder / "train.jsonl", folder / "heldout.jsonl"
            if not (train.is_file() and held.is_file()):
                write_demo_data(folder)
            return train if value == DEMO_TRAIN else held
        path = Path(value)
        if not path.is_file():
            raise LorakitError(f"dataset: {value} does not exist (any more)")
        return path

    def dataset_value(self, path: str | Path) -> str:
        """The dropdown value for a data file (the demo's own choice for the demo data)."""
        path = Path(path).resolve()
        if path == (self.data_dir / "demo" / "train.jsonl").resolve():
            return DEMO_TRAIN
        if path == (self.data_dir / "demo" / "heldout.jsonl").resolve():
            return DEMO_HELDOUT
        return str(path)

    def save_upload(self, uploaded: str | Path, original_name: str | None = None) -> Path:
        """Check an uploaded file as training data and copy it into data/: a supported kind
        (DATA_SUFFIXES), at most max_upload_bytes, read by the same loader training uses. A refused
        file raises DataError naming it by its own name (and the record); nothing is written."""
        uploaded = Path(uploaded)
        name = Path(original_name or uploaded.name).name
        if Path(name).suffix.lower() not in DATA_SUFFIXES:
            raise DataError(
                name,
                f"unsupported file kind {Path(name).suffix or '(no extension)'!r}; "
                "upload a .json, .jsonl (or .ndjson), .csv or .parquet file",
            )
        size = uploaded.stat().st_size
        if size > self.max_upload_bytes:
            raise DataError(
                name,
                f"{size / MB:,.1f} MB is more than the upload limit of {_mb(self.max_upload_bytes)} "
                "(lorakit ui --max-upload-mb)",
            )
        try:
            loaded = load_examples(uploaded)
        except DataError as e:  # name the file as the user knows it, not gradio's temp path
            raise DataError(name, str(e).replace(f"{uploaded}: ", "", 1)) from None
        if not loaded.examples:
            raise DataError(name, "holds no records")
        stem, suffix = Path(name).stem, Path(name).suffix.lower()
        stem = safe_stem(stem)
        target = self.path_for(self.data_dir, f"{stem}{suffix}", "upload")
        n = 1
        while target.exists() and target.read_bytes() != uploaded.read_bytes():
            target = self.path_for(self.data_dir, f"{stem}-{n}{suffix}", "upload")
            n += 1
        if not target.exists():
            shutil.copyfile(uploaded, target)
        return target

    # ---- adapters ---------------------------------------------------------------------------
    def adapter(self, name: str) -> AdapterInfo:
        folder = self.adapters_dir / name
        return AdapterInfo(
            name=name,
            folder=folder,
            manifest=read_manifest(folder),
            config=read_config_record(folder),
            checkpoints=complete_checkpoints(folder) if folder.is_dir() else [],
        )

    def adapters(self) -> list[AdapterInfo]:
        """Run folders (and plain peft adapters) under adapters/, newest first."""
        folders = [
            p
            for p in self.adapters_dir.iterdir()
            if p.is_dir()
            and not p.name.startswith(".")
            and ((p / ADAPTER_CONFIG).is_file() or (p / CONFIG_RECORD).is_file() or (p / UI_CONFIG).is_file())
        ]
        folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [self.adapter(p.name) for p in folders]

    def adapter_choices(self) -> list[tuple[str, str]]:
        """(label, key) of every adapter that can be loaded (finished, or a run's last checkpoint)."""
        return [(a.label, a.key) for a in self.adapters() if a.usable is not None]

    def resolve_adapter(self, key: str) -> Path:
        """A dropdown key (NAME or NAME/checkpoint-N) -> the folder to load."""
        if not key:
            raise LorakitError("adapter: choose one")
        parts = key.split("/")
        path = None
        if len(parts) <= 2 and all(p and p not in (".", "..") and "\\" not in p for p in parts):
            path = (self.adapters_dir / key).resolve()
        if path is None or not self.inside(path, self.adapters_dir) or not (path / ADAPTER_CONFIG).is_file():
            raise LorakitError(f"adapter: {key} is not an adapter in {self.adapters_dir}")
        if path.name.startswith("checkpoint-") and not (path / CHECKPOINT_MARKER).is_file():
            raise LorakitError(f"adapter: {key} was not completely written (the run died while saving it)")
        return path

    # ---- base models ------------------------------------------------------------------------
    def base_model_choices(self) -> list[tuple[str, str]]:
        """The built-in aliases (fetched on first use), cached conversions, and model folders
        under models/ and merged/."""
        cached = {m.name: m for m in list_cached()}
        choices = []
        for alias in ALIASES:
            note = "default" if alias == DEFAULT_BASE_MODEL else ""
            note += "" if alias in cached else (", " if note else "") + "fetched on first use"
            choices.append((f"{alias} ({note})" if note else alias, alias))
        for name, model in cached.items():
            if name not in ALIASES:
                choices.append((f"cache: {name}", str(model.path)))
        for sub in ("models", "merged"):
            for folder in sorted((self.root / sub).glob("*/config.json")):
                choices.append((f"{sub}/{folder.parent.name}", str(folder.parent)))
        return choices
