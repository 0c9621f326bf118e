"""kill -9 in the middle of writing: merge, adapter quantize and export --to hf, each over an earlier
output at the same --out (--force). The earlier output stays byte-identical, nothing is half-written
under the final name, and the next run of the same command succeeds (it clears what the killed one
left). tests/infer/test_export.py (heavy) kills an export with nothing at --out yet; these keep one there.

Mid-write, deterministically: the command runs in a child Python whose safetensors writer (every
weights file lorakit writes goes through it) writes half of the file and then stalls, as on a slow
disk; the test polls until that half file shows up in the hidden staging folder and kills the child
there. This stall lives only in this test's child process; lorakit has no hook for it."""

from __future__ import annotations

import shutil
import sys
import time

import pytest
from fault_helpers import leftovers, tree
from process_helpers import kill_when
from random_adapter import make_random_adapter

# merge and export start transformers in the child (~8-14 s each here): the heavy step (pyproject: markers);
# quantize (~2 s) stays in the default run
HEAVY = pytest.mark.heavy

STALL_MID_WRITE = """
import sys, time
import safetensors.torch as st

def half_then_stall(tensors, filename, metadata=None):
    data = st.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
    time.sleep(600)

st.save_file = half_then_stall  # before transformers and peft import it
sys.argv[0] = "lorakit"
from lorakit.cli import main
main()
"""


def kill_mid_write(args: list, out, tag: str, cwd) -> list:
    """Run `lorakit ARGS` with the stalling writer and kill -9 it once a weights file it wrote shows
    up in any folder beside ``out`` (or in ``out``); that must be the hidden staging folder, which
    stays (the killed process could not clean it up): returned."""
    t0 = time.time_ns()

    def fresh_weights(folder) -> bool:
        try:
            return folder.is_dir() and any(
                f.suffix == ".safetensors" and f.stat().st_mtime_ns >= t0 for f in folder.iterdir()
            )
        except FileNotFoundError:  # renamed while we looked
            return False

    cmd = [sys.executable, "-c", STALL_MID_WRITE, *map(str, args)]
    kill_when(cmd, "*", out.parent, fresh_weights, cwd)
    return [p for p in out.parent.glob(f".{out.name}.{tag}-*") if fresh_weights(p)]


@pytest.fixture(scope="module")
def other_adapter(tiny_model_dir, tmp_path_factory):
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("faults-other") / "lora", seed=2)


@HEAVY
def test_kill_9_during_merge(adapter, tiny_model_dir, tmp_path, run_cli):
    out = tmp_path / "merged"
    args = ["merge", "--adapter", adapter, "--base", tiny_model_dir, "--out", out]
    assert run_cli(*args)[0] == 0  # the earlier merge: fp32
    before = tree(out)
    again = [*args, "--dtype", "bf16", "--force"]
    stale = kill_mid_write(again, out, "merging", tmp_path)
    assert tree(out) == before
    assert len(stale) == 1  # the half file was in the hidden staging folder
    code, _, err = run_cli(*again)
    assert code == 0, err[-3000:]
    from transformers import AutoModelForCausalLM

    assert str(AutoModelForCausalLM.from_pretrained(out).dtype) == "torch.bfloat16"
    assert leftovers(tmp_path) == []


def test_kill_9_during_quantize(adapter, other_adapter, tmp_path, run_cli):
    from lorakit.infer.quantize import read_int8_adapter

    out = tmp_path / "int8"
    assert run_cli("adapter", "quantize", other_adapter, "--out", out)[0] == 0  # the earlier one, another adapter
    before = tree(out)
    again = ["adapter", "quantize", adapter, "--out", out, "--force"]
    stale = kill_mid_write(again, out, "quantizing", tmp_path)
    assert tree(out) == before
    assert len(stale) == 1  # the half file was in the hidden staging folder
    code, _, err = run_cli(*again)
    assert code == 0, err[-3000:]
    assert read_int8_adapter(out) and tree(out) != before
    assert leftovers(tmp_path) == []


@HEAVY
def test_kill_9_during_export(adapter, tiny_model_dir, tmp_path, run_cli):
    out = tmp_path / "hf"
    args = ["export", "--adapter", adapter, "--base", tiny_model_dir, "--to", "hf", "--out", out, "--no-verify"]
    assert run_cli(*args)[0] == 0
    before = tree(out)
    again = [*args, "--dtype", "bf16", "--force"]
    stale = kill_mid_write(again, out, "exporting", tmp_path)
    assert tree(out) == before
    assert len(stale) == 1  # the half file was in the hidden staging folder
    code, _, err = run_cli(*again)
    assert code == 0, err[-3000:]
    assert '"dtype": "bf16"' in (out / "export.json").read_text()
    assert leftovers(tmp_path) == []
    shutil.rmtree(out)
