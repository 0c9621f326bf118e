"""Writing outputs so that nothing half-written is ever left where a user looks.

Every file lorakit writes for a user goes through ``atomic_write_*`` (a temp file in the same
folder, flushed and fsynced, then ``os.replace``d over the final name); every finished folder
is built in ``staged_folder`` and goes through ``move_into_place``. These are the only two ways.

A full disk (``space_for``, which both use): the temp file or staging folder is removed, the old
output stays as it was, and the error is one ``DiskFull`` line naming the output, about how much it
needed and how much is free. Given the size beforehand, a write that cannot fit is refused before
it starts.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import LorakitError

TEMP_SUFFIX = ".tmp"  # a hidden ``.NAME.XXXX.tmp`` beside the final name; never read by lorakit


# ---- a full disk --------------------------------------------------------------------------------


class DiskFull(LorakitError, OSError):
    """An output that did not fit on its file system. One line: the output's path, about how much
    it needs and how much is free there. Also an OSError (ENOSPC), so code that handles a refused
    write as an OSError still does."""

    def __init__(self, path: str | Path, needed: int | None = None, free: int | None = None, hint: str = ""):
        path = Path(path)
        OSError.__init__(self, errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.path, self.needed = path, needed
        self.free = free_bytes(path) if free is None else free
        where = f" on {mount_point(path)}"
        if self.free is None:  # the file system does not say
            why = f"needs about {human_bytes(needed)}" if needed is not None else f"the file system{where} is full"
        elif needed is not None and needed > self.free:
            why = f"needs about {human_bytes(needed)}, {human_bytes(self.free)} free{where}"
        else:  # the size was not known beforehand, or was more than we thought
            why = f"needs more than the {human_bytes(self.free)} free{where}"
        self.message = f"{path}: no space left on device: {why}" + (f"; {hint}" if hint else "")

    def __str__(self) -> str:
        return self.message


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _existing(path: str | Path) -> Path:
    """``path`` or the nearest folder above it that exists (an output may not exist yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int | None:
    """Bytes this process may still write on the file system that holds (or will hold) ``path``;
    None when the system does not say."""
    try:
        if not hasattr(os, "statvfs"):
            return shutil.disk_usage(_existing(path)).free
        st = os.statvfs(_existing(path))
    except OSError:
        return None
    # root may also write the blocks a file system keeps back for it (ext4: 5%)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def mount_point(path: str | Path) -> Path:
    path = _existing(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def bytes_on_disk(sizes: Iterable[int], near: str | Path) -> int:
    """What files of these sizes take on the file system of ``near`` (each rounded up to its blocks)."""
    try:
        block = os.statvfs(_existing(near)).f_frsize or 4096
    except (OSError, AttributeError):  # AttributeError: no statvfs on this system
        block = 4096
    return sum(-(-int(s) // block) * block for s in sizes)


# what a full disk says when it does not come as OSError(ENOSPC): safetensors' and tokenizers' Rust
# errors, quota errors
_NO_SPACE_TEXT = ("No space left on device", "(os error 28)", "Disk quota exceeded", "(os error 122)")
# torch.save's zip writer does not say why a write failed ("unexpected pos 576 vs 534"); a file
# system left with (almost) nothing free says it for it
_TORCH_WRITER_TEXT = ("PytorchStreamWriter", "unexpected pos", "file write failed")


def is_disk_full(e: BaseException, path: str | Path | None = None) -> bool:
    """Whether ``e`` (or what caused it) is the file system running out of space. ``path``: where the
    write went; a torch.save error counts when that file system has less than 1 MiB left."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(cur)
        if any(t in text for t in _NO_SPACE_TEXT):
            return True
        if path is not None and any(t in text for t in _TORCH_WRITER_TEXT) and (free_bytes(path) or 0) < 1 << 20:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def check_space(path: str | Path, needed: int | None) -> None:
    """Refuse, before writing, an output of about ``needed`` bytes that cannot fit: one DiskFull line."""
    free = free_bytes(path)
    if needed is not None and free is not None and free < needed:
        raise DiskFull(path, needed, free)


@contextmanager
def space_for(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Write ``path`` (a file or a folder) in the block: refused first when about ``needed`` bytes are
    not free, and a full disk in the block (any library's way of saying it) becomes one DiskFull line
    naming ``path`` (or the file in ``path`` that a DiskFull from within named already; a hidden temp
    or staging name is replaced by ``path``). The block cleans up its own temp files before the error
    leaves it, so the free space the line reports is what there was before the write."""
    check_space(path, needed)
    try:
        yield
    except Exception as e:
        if isinstance(e, DiskFull) and _within(e.path, Path(path)):
            raise  # already names this output or a file in it
        if is_disk_full(e, path):
            _release(e)
            raise DiskFull(path, needed) from None
        raise


def _within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or a file in it that a user sees (no hidden temp or staging name)."""
    try:
        parts = inner.relative_to(outer).parts
    except ValueError:
        return False
    return not any(part.startswith(".") for part in parts)


def _release(e: BaseException) -> None:
    """Let go of the finished frames of a failed write (and of the errors before it): a file they
    still hold open keeps its space even once removed, and the free space reported must count it."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        traceback.clear_frames(cur.__traceback__)
        cur = cur.__cause__ or cur.__context__


@contextmanager
def atomic_open(path: str | Path, needed: int | None = None) -> Iterator[IO[bytes]]:
    """A binary file to write ``path`` through: the data goes to a hidden temp file in the same
    folder, flushed and fsynced, and replaces ``path`` only when the block ends without an error.
    A reader sees the old file or the whole new one; an error or a kill leaves the old one, and a
    full disk is one DiskFull line (``needed``: the size, when known, to refuse it beforehand)."""
    path = Path(path)
    with space_for(path, needed):
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
    with atomic_open(path, needed=bytes_on_disk([len(data)], Path(path).parent)) as f:
        f.write(data)
    return Path(path)


def atomic_write_files(folder: str | Path, files: dict[str, bytes]) -> dict[str, Path]:
    """Write several files into ``folder`` all or none: every one to its temp file first (so all the
    space is taken before any is replaced), then each renamed over its final name. A full disk or
    another error leaves every old file as it was and no temp file; one DiskFull line names the
    folder and the space all of them need."""
    folder = Path(folder)
    needed = bytes_on_disk((len(d) for d in files.values()), folder)
    temps: dict[str, str] = {}
    with space_for(folder, needed):
        try:
            for name, data in files.items():
                fd, temps[name] = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TEMP_SUFFIX)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            for name, tmp in temps.items():
                os.chmod(tmp, 0o666 & ~umask)
                os.replace(tmp, folder / name)
        except BaseException:
            for tmp in temps.values():
                try:
                    os.unlink(tmp)
                except OSError:  # already renamed into place
                    pass
            raise
    return {name: folder / name for name in files}


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` whole or not at all: a failed write (a full disk: one DiskFull
    line) cuts the file back to where it was, so no reader meets half a line."""
    path = Path(path)
    data = memoryview(text.encode("utf-8"))
    with space_for(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data) :]
            except BaseException:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


@contextmanager
def staged_folder(out: str | Path, tag: str = "staging", needed: int | None = None) -> Iterator[Path]:
    """A new hidden folder beside ``out`` to write into; moved to ``out`` (move_into_place) when
    the block ends without an error, removed in every case, so an error or a kill leaves ``out``
    as it was. Staging folders of killed earlier runs for the same ``out`` are removed first.
    A full disk is one DiskFull line naming ``out`` (``needed``: about how many bytes the folder
    takes, when known: refused before anything is written when that much is not free)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(out, tag)  # first: their space counts as free
    staging = out.with_name(f".{out.name}.{tag}-{os.getpid()}")
    with space_for(out, needed):
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
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
    loss: its ``finally`` never ran); a live process's staging folder is left alone. An earlier
    output a killed move_into_place had set aside (``.NAME.old-PID``, where the system has no atomic
    swap) goes back to ``out`` when nothing took its place, else it is removed."""
    removed = []
    for kind in (tag, "old"):
        for stale in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                os.rename(stale, out)
                continue
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or the
    file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):  # no C library to ask (Windows: TypeError), no renameat2
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def move_into_place(staging: Path, out: Path) -> None:
    """Put a finished ``staging`` folder at ``out``, replacing what was there only once the new
    one is complete: one atomic swap where the system has it (the old folder then sits at the
    staging name and is removed; a kill before that leaves it to remove_dead_staging), else two
    renames on one file system."""
    if out.exists():
        if _exchange(staging, out):
            shutil.rmtree(staging, ignore_errors=True)
            return
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
    try:
        out = Path(out).expanduser().absolute()
    except RuntimeError as e:  # ~name of no user (found by hypothesis)
        raise LorakitError(f"{flag}: {out}: {e}") from None
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LorakitError(f"{flag}: {out}: {parent} is not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".lorakit-write-check-", dir=parent)
    except OSError as e:
        if is_disk_full(e):  # not even room for a folder
            raise DiskFull(out) from None
        raise LorakitError(f"{flag}: {out}: cannot write in {parent} ({e.strerror or e})") from None
    os.rmdir(probe)
