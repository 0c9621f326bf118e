"""Fixtures for the `lorakit ui` tests: a workdir holding the tiny model, and small data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lorakit.ui.workdir import Workdir


def alpaca_records(n: int = 24) -> list[dict]:
    return [
        {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} plus {i} is {2 * i}."} for i in range(n)
    ]


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    path = tmp_path / "sums.json"
    path.write_text(json.dumps(alpaca_records()), encoding="utf-8")
    return path


@pytest.fixture
def workdir(tmp_path, tiny_model_dir) -> Workdir:
    """A fresh workdir with the tiny model as WORKDIR/models/tiny-llama."""
    wd = Workdir(tmp_path / "workdir")
    shutil.copytree(tiny_model_dir, wd.models_dir / "tiny-llama")
    return wd


@pytest.fixture
def tiny_base(workdir) -> str:
    return str(workdir.models_dir / "tiny-llama")
