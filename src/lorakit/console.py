"""Status lines for the user, on stderr, so stdout carries only results (answers, paths)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True, highlight=False)


def _quiet() -> bool:
    return int(os.environ.get("RANK", "0")) != 0  # only rank 0 talks in multi-process runs


def info(message: str) -> None:
    if not _quiet():
        err_console.print(f"[bold cyan]lorakit[/] {escape(message)}", markup=True, soft_wrap=True)


def warn(message: str) -> None:
    if not _quiet():
        err_console.print(f"[bold yellow]warning[/] {escape(message)}", markup=True, soft_wrap=True)
