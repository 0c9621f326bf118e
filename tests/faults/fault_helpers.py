"""Helpers of the fault tests (tests/faults is on sys.path for its modules): a small disk to fill,
byte-identity of a folder, leftovers, the one error line."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


class SmallDisk:
    """A mounted tmpfs at ``path``; ``leave(n)`` fills it so that about ``n`` bytes stay free."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    @property
    def free(self) -> int:
        return shutil.disk_usage(self.path).free

    def leave(self, n: int) -> int:
        """Fill the disk (one filler file, grown or shrunk) so that ``n`` bytes (rounded down to pages)
        stay free; returns the free bytes."""
        have = self.filler.stat().st_size if self.filler.exists() else 0
        size = have + self.free - n
        assert size >= 0, f"the disk holds more than leaves {n} bytes free"
        with open(self.filler, "ab") as f:
            f.truncate(0)
            if size:
                os.posix_fallocate(f.fileno(), 0, size)
        return self.free

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> sha256 of its bytes: byte-identical or not."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    """Hidden temp files and staging folders anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def error_line(err: str) -> str:
    """The one `error:` line of stderr (progress bars and library notices aside), no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]
