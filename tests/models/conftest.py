"""Fixtures for the model cache tests.

Fast tests get an empty ``LORAKIT_HOME`` under tmp_path and replace the GGUF dequantization
(about 20 s on the real model) with loading the tiny model from tests/conftest.py. Slow tests share
one real pull of smollm2-135m per machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorakit.models import registry


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty lorakit home for this test."""
    folder = tmp_path / "lorakit-home"
    monkeypatch.setenv("LORAKIT_HOME", str(folder))
    return folder


@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    """A file that only the fake loader below accepts as a GGUF model."""
    path = tmp_path / "Tiny-Model.Q4_0.gguf"
    path.write_bytes(b"GGUF" + os.urandom(64))
    return path


@pytest.fixture
def fake_gguf_loader(monkeypatch, tiny_model_dir) -> list[Path]:
    """Make "GGUF loading" return the tiny model and tokenizer; the list records each call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls: list[Path] = []

    def load(gguf_path):
        calls.append(Path(gguf_path))
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)

    monkeypatch.setattr(registry, "_load_from_gguf", load)
    return calls


@pytest.fixture
def use_shared_home(shared_home, monkeypatch) -> Path:
    monkeypatch.setenv("LORAKIT_HOME", str(shared_home))
    return shared_home
