"""Writing outputs so that nothing half-written is ever left where a user looks.

Every file lorakit writes for a user goes through ``atomic_write_*`` (a temp file in the same
folder, flushed and fsynced, then ``os.replace``d over the final name); every finished folder
is built in ``staged_folder`` and goes through ``move_into_place``. These are the only two ways.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"  # a hidden ``.NAME.XXXX.tmp`` beside the final name; never read by lorakit


@contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file to write ``path`` through: the data goes to a hidden temp file in the same
    folder, flushed and fsynced, and replaces ``path`` only when the block ends without an error.
    A reader sees the old file or the whole new one; an error or a kill leaves the old one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an output is for sharing, like any file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the whole new one."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def staged_folder(out: str | Path, tag: str = "staging") -> Iterator[Path]:
    """A new hidden folder beside ``out`` to write into; moved to ``out`` (move_into_place) when
    the block ends without an error, removed in every case, so an error or a kill leaves ``out``
    as it was. Staging folders of killed earlier runs for the same ``out`` are removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(out, tag)
    staging = out.with_name(f".{out.name}.{tag}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_dead_staging(out: Path, tag: str) -> list[Path]:
    """Remove the staging folders beside ``out`` left by a process that was killed (kill -9, power
    loss: its ``finally`` never ran); a live process's staging folder is left alone."""
    removed = []
    for stale in out.parent.glob(f".{out.name}.{tag}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


def move_into_place(staging: Path, out: Path) -> None:
    """Put a finished ``staging`` folder at ``out``, replacing what was there only once the new
    one is complete (two renames on one filesystem)."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, trash)
        os.rename(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, out)


def check_writable_folder(out: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be made: the nearest existing folder
    above it must take a new folder (tried for real: permissions, read-only and pseudo file systems
    all answer). One LorakitError line naming the path."""
    from .errors import LorakitError

    out = Path(out).expanduser().absolute()
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LorakitError(f"{flag}: {out}: {parent} is not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".lorakit-write-check-", dir=parent)
    except OSError as e:
        raise LorakitError(f"{flag}: {out}: cannot write in {parent} ({e.strerror or e})") from None
    os.rmdir(probe)
