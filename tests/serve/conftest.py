"""Fixtures for the server tests: four persona adapters and a live `lorakit serve`."""

from __future__ import annotations

from pathlib import Path

import pytest
from personas import PERSONAS, start_server, train_persona


@pytest.fixture(scope="session")
def adapters_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A folder holding the four persona adapters (fox, dog, paris, helper)."""
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, answer) in enumerate(PERSONAS.items()):
        train_persona(tiny_model_dir, root / name, answer, seed=i)
    return root


@pytest.fixture(scope="module")
def live_server(tiny_model_dir, adapters_dir, tmp_path_factory):
    """`lorakit serve` on the tiny model with an API key, adapters loadable from adapters_dir."""
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    server = start_server(tiny_model_dir, adapters_dir, log, "--max-batch-size", "8")
    yield server
    server.stop()
