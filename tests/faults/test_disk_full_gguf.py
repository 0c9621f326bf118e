"""A full disk during a GGUF export (llama.cpp's converter runs in a process of its own and writes
the file): one line naming the output and the space, exit 2, the earlier export byte-identical,
nothing half-written left beside it. Needs llama.cpp's converter: the heavy step of .ci/run."""

from __future__ import annotations

import pytest
from fault_helpers import error_line, leftovers, tree
from random_adapter import make_random_adapter
from tiny_models import build_tiny_smol_model

from lorakit.files import human_bytes

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'lorakit[gguf]'")
pytest.importorskip("sentencepiece", reason="llama.cpp's converter needs sentencepiece: pip install 'lorakit[gguf]'")

pytestmark = pytest.mark.heavy

KIB = 1024


@pytest.fixture(autouse=True)
def _llama_cpp_cache(shared_home, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(shared_home))


@pytest.fixture(scope="module")
def gguf_base(smollm2_path, tmp_path_factory):
    """A 2-layer random Llama (hidden 64) with smollm2's tokenizer: its f16 GGUF is about 6.5 MiB,
    more than the whole 4 MiB test disk."""
    return build_tiny_smol_model(tmp_path_factory.mktemp("tiny-smol"), smollm2_path)


@pytest.fixture(scope="module")
def gguf_adapter(gguf_base, tmp_path_factory):
    return make_random_adapter(gguf_base, tmp_path_factory.mktemp("gguf-adapter") / "lora")


def export(run_cli, adapter, base, to, out):
    return run_cli("export", "--adapter", adapter, "--base", base, "--to", to, "--out", out, "--force", "--no-verify")


def test_gguf_lora_export_on_a_full_disk_keeps_the_earlier_export(disk_24m, gguf_adapter, gguf_base, run_cli):
    """gguf-lora writes the adapter's GGUF and the base's f16 GGUF (about 8 MiB here)."""
    small_disk = disk_24m
    out = small_disk.path / "lora-gguf"
    code, _, err = export(run_cli, gguf_adapter, gguf_base, "gguf-lora", out)
    assert code == 0, err[-3000:]
    before = tree(out)
    free = small_disk.leave(1024 * KIB)  # less than the export's 8 MiB
    code, _, err = export(run_cli, gguf_adapter, gguf_base, "gguf-lora", out)
    assert code == 2, err[-3000:]
    line = error_line(err)
    assert line.startswith(f"error: {out}: no space left on device: "), line
    assert f"{human_bytes(free)} free on {small_disk.path}" in line, line
    assert tree(out) == before and leftovers(small_disk.path) == [] and small_disk.free == free


def test_merged_gguf_larger_than_the_disk(small_disk, gguf_adapter, gguf_base, run_cli):
    out = small_disk.path / "merged-gguf"
    free = small_disk.free
    code, _, err = export(run_cli, gguf_adapter, gguf_base, "gguf", out)
    assert code == 2, err[-3000:]
    line = error_line(err)
    assert line.startswith(f"error: {out}: no space left on device: "), line
    assert not out.exists() and leftovers(small_disk.path) == [] and small_disk.free == free
