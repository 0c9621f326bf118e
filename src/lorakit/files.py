"""Writing outputs so that nothing half-written is ever left where a user looks."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


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
