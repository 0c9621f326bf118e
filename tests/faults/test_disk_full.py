"""A nearly full disk (a small tmpfs) under every writer of lorakit: merge, adapter quantize, export
--to hf, eval's report, a training checkpoint and the trained adapter. Each time: one `error:` line
naming the output, the space it needs and the space free, exit 2; the output that was there before
byte-identical; nothing half-written under a final name and no temp file left.

"before": the writer knows the size and refuses before writing; "midway" (files.check_space
switched off): the disk fills in the middle of the write, as when the size was misjudged or another
process took the space, and the cleanup is what keeps the promise."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys

import pytest
from fault_helpers import error_line, leftovers, tree

from lorakit import files

KIB = 1024


def no_precheck(monkeypatch):
    monkeypatch.setattr(files, "check_space", lambda path, needed: None)


def parse_needed(line: str) -> float:
    """KiB in 'needs about N KiB' of an error line."""
    m = re.search(r"needs about ([\d.]+) (KiB|MiB)", line)
    assert m, line
    return float(m.group(1)) * (1024 if m.group(2) == "MiB" else 1)


def assert_disk_full(code, err, out, disk, free):
    """Exit 2 and one error line: the output, 'no space left on device', what it needs, what is free."""
    assert code == 2, err[-3000:]
    line = error_line(err)
    assert line.startswith(f"error: {out}: no space left on device: "), line
    assert f"{free / KIB:.1f} KiB free on {disk.path}" in line, line
    return line


# ---- the helpers themselves -----------------------------------------------------------------------


def test_atomic_write_on_a_full_disk_keeps_the_old_file(small_disk, monkeypatch):
    target = small_disk.path / "report.json"
    target.write_bytes(b"old\n")
    free = small_disk.leave(8 * KIB)
    with pytest.raises(files.DiskFull) as e:
        files.atomic_write_bytes(target, b"x" * 20 * KIB)
    assert (
        str(e.value) == f"{target}: no space left on device: needs about 20.0 KiB, 8.0 KiB free on {small_disk.path}"
    )
    no_precheck(monkeypatch)
    with pytest.raises(files.DiskFull) as e:
        files.atomic_write_bytes(target, b"x" * 20 * KIB)
    assert small_disk.free == free  # the temp file is gone
    assert e.value.errno == 28 and isinstance(e.value, OSError)  # still an OSError for callers that catch those
    assert target.read_bytes() == b"old\n" and leftovers(small_disk.path) == []


def test_appended_line_is_whole_or_absent(small_disk):
    log = small_disk.path / "train_log.jsonl"
    log.write_text('{"step": 1}\n')
    small_disk.leave(0)
    with pytest.raises(files.DiskFull) as e:
        files.append_text(log, json.dumps({"step": 2, "pad": "x" * 8 * KIB}) + "\n")  # more than the page holds
    assert str(e.value).startswith(f"{log}: no space left on device: ")
    assert log.read_text() == '{"step": 1}\n'  # not half a line


# ---- merge, quantize, export --------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged_before(adapter, tiny_model_dir, tmp_path_factory):
    from lorakit.infer.merge import merge_adapter

    return merge_adapter(adapter, tmp_path_factory.mktemp("before") / "merged", base=str(tiny_model_dir))


@pytest.mark.parametrize(
    "when, leave",
    [
        ("before", 300 * KIB),  # the weights alone (401 KiB) do not fit
        ("midway", 300 * KIB),  # ... found out while writing them (safetensors' error)
        ("midway", 420 * KIB),  # the weights fit, the tokenizer does not (tokenizers' error)
    ],
)
def test_merge_on_a_full_disk(when, leave, small_disk, merged_before, adapter, tiny_model_dir, run_cli, monkeypatch):
    out = small_disk.path / "merged"
    shutil.copytree(merged_before, out)  # an earlier merge at the same --out
    before = tree(out)
    if when == "midway":
        no_precheck(monkeypatch)
    free = small_disk.leave(leave)
    code, _, err = run_cli("merge", "--adapter", adapter, "--base", tiny_model_dir, "--out", out, "--force")
    line = assert_disk_full(code, err, out, small_disk, free)
    merged_kib = sum(p.stat().st_size for p in out.iterdir()) / KIB
    assert 0.9 * merged_kib < parse_needed(line) < 1.2 * merged_kib, line
    assert tree(out) == before and leftovers(small_disk.path) == []
    assert small_disk.free == free  # nothing else left behind either


@pytest.mark.parametrize("command", ["quantize", pytest.param("merge", marks=pytest.mark.heavy)])
def test_full_disk_from_the_command_line(command, small_disk, merged_before, int8_before, adapter, tiny_model_dir):
    """As a user runs it (a new process; merge imports transformers there, ~10 s: the heavy step)."""
    if command == "merge":
        out, previous = small_disk.path / "merged", merged_before
        args = ["merge", "--adapter", str(adapter), "--base", str(tiny_model_dir)]
    else:
        out, previous = small_disk.path / "int8", int8_before
        args = ["adapter", "quantize", str(adapter)]
    shutil.copytree(previous, out)
    before = tree(out)
    free = small_disk.leave(8 * KIB)
    cmd = [sys.executable, "-m", "lorakit.cli", *args, "--out", str(out), "--force"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.stderr.splitlines() == [r.stderr.strip()], r.stderr  # one line
    line = assert_disk_full(r.returncode, r.stderr, out, small_disk, free)
    assert re.fullmatch(rf"error: {out}: no space left on device: needs about [\d.]+ KiB, 8\.0 KiB free on \S+", line)
    assert r.stdout == "" and tree(out) == before and leftovers(small_disk.path) == []


@pytest.fixture(scope="module")
def int8_before(adapter, tmp_path_factory):
    from lorakit.infer.quantize import quantize_adapter

    out = tmp_path_factory.mktemp("before") / "int8"
    quantize_adapter(adapter, out)
    return out


@pytest.mark.parametrize("when, leave", [("before", 8 * KIB), ("midway", 8 * KIB), ("midway", 12 * KIB)])
def test_quantize_on_a_full_disk(when, leave, small_disk, int8_before, adapter, run_cli, monkeypatch):
    out = small_disk.path / "int8"
    shutil.copytree(int8_before, out)
    before = tree(out)
    if when == "midway":
        no_precheck(monkeypatch)
    free = small_disk.leave(leave)
    code, _, err = run_cli("adapter", "quantize", adapter, "--out", out, "--force")
    line = assert_disk_full(code, err, out, small_disk, free)
    assert parse_needed(line) >= 12, line  # 3 files, at least one block each
    assert tree(out) == before and leftovers(small_disk.path) == [] and small_disk.free == free


@pytest.fixture(scope="module")
def export_before(adapter, tiny_model_dir, tmp_path_factory):
    from lorakit.infer.export import export

    out = tmp_path_factory.mktemp("before") / "hf"
    export(adapter, out, "hf", base=str(tiny_model_dir), verify=False)
    return out


@pytest.mark.parametrize("when, leave", [("before", 300 * KIB), ("midway", 420 * KIB)])
def test_export_hf_on_a_full_disk(
    when, leave, small_disk, export_before, adapter, tiny_model_dir, run_cli, monkeypatch
):
    out = small_disk.path / "hf"
    shutil.copytree(export_before, out)
    before = tree(out)
    if when == "midway":
        no_precheck(monkeypatch)
    free = small_disk.leave(leave)
    code, _, err = run_cli(
        "export", "--adapter", adapter, "--base", tiny_model_dir, "--to", "hf", "--out", out, "--force", "--no-verify"
    )
    assert_disk_full(code, err, out, small_disk, free)
    assert tree(out) == before and leftovers(small_disk.path) == [] and small_disk.free == free


# ---- eval's report ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "qa.json"
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": str(2 * i)} for i in range(3)]
    path.write_text(json.dumps(rows))
    return path


def eval_args(adapter, tiny_model_dir, data, out):
    return ["eval", "--data", data, "--out", out, "--base", tiny_model_dir, "--adapter", adapter]


EVAL_OPTIONS = ["--max-new-tokens", "4", "--metrics", "exact_match,f1"]


@pytest.fixture(scope="module")
def report_before(adapter, tiny_model_dir, eval_data, tmp_path_factory):
    from lorakit.eval.runner import evaluate

    out = tmp_path_factory.mktemp("before") / "report"
    evaluate(str(tiny_model_dir), [str(adapter)], [str(eval_data)], out, metrics=["exact_match"], max_new_tokens=4)
    return out


@pytest.mark.parametrize("when", ["before", "midway"])
def test_eval_report_on_a_full_disk(
    when, small_disk, report_before, adapter, tiny_model_dir, eval_data, run_cli, monkeypatch
):
    out = small_disk.path / "report"
    shutil.copytree(report_before, out)
    before = tree(out)
    if when == "midway":
        no_precheck(monkeypatch)
    free = small_disk.leave(4 * KIB)  # the new report.json fits, the plots do not: no report mixed from two runs
    code, _, err = run_cli(*eval_args(adapter, tiny_model_dir, eval_data, out), *EVAL_OPTIONS)
    line = assert_disk_full(code, err, out, small_disk, free)
    report_kib = sum(p.stat().st_size for p in out.iterdir()) / KIB
    assert 0.5 * report_kib < parse_needed(line) < 2 * report_kib, line
    assert tree(out) == before and leftovers(small_disk.path) == [] and small_disk.free == free


# ---- training: a checkpoint, the adapter ----------------------------------------------------------


@pytest.fixture
def train_config(tiny_model_dir, tmp_path):
    """A 4-step run on the tiny model; its output_dir is given on the command line."""
    data = tmp_path / "data.json"
    data.write_text(
        json.dumps([{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(16)])
    )
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"base_model: {tiny_model_dir}\ndata_path: {data}\nbatch_size: 4\nmicro_batch_size: 2\nmax_steps: 4\n"
        "learning_rate: 1.0e-2\nval_set_size: 0\nlogging_steps: 1\nprecision: fp32\nseed: 3\n"
    )
    return cfg


# what a trained adapter folder holds that a failed later run into the same folder must not touch
# (train_log.jsonl and the checkpoints belong to the run: overwrite_output_dir starts them anew)
ADAPTER_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "manifest.json",
    "lorakit_template.json",
    "lorakit_config.yaml",  # the earlier run's record stays with its adapter
)


def adapter_tree(out):
    return {k: v for k, v in tree(out).items() if k in ADAPTER_FILES or k.startswith("tokenizer")}


@pytest.mark.parametrize(
    "when, leave",
    [
        ("before", 16 * KIB),  # checkpoint-2's size is not free: refused before writing
        ("midway", 80 * KIB),  # the weights and tokenizer fit, optimizer.pt does not (torch.save's error)
    ],
)
def test_checkpoint_on_a_full_disk(when, leave, small_disk, train_config, run_cli, monkeypatch):
    from lorakit.runfolder import read_train_log
    from lorakit.train import callbacks

    out = small_disk.path / "run"
    first = {}
    mark = callbacks.CheckpointMarkerCallback.on_save

    def fill_after_first_checkpoint(self, args, state, control, **kw):
        mark(self, args, state, control, **kw)
        if state.global_step == 2:  # checkpoint-2 is complete: now the disk is full
            first.update(tree(out / "checkpoint-2"))
            first["free"] = small_disk.leave(leave)

    monkeypatch.setattr(callbacks.CheckpointMarkerCallback, "on_save", fill_after_first_checkpoint)
    if when == "midway":
        no_precheck(monkeypatch)
    code, _, err = run_cli("train", train_config, f"output_dir={out}", "save_steps=2")
    assert first.pop("free") - small_disk.free <= 8 * KIB  # steps 3 and 4 logged: a page of each log, at most
    line = assert_disk_full(code, err, out / "checkpoint-4", small_disk, small_disk.free)
    assert line.endswith(
        f"; the last complete checkpoint is {out / 'checkpoint-2'}; free some space and resume with "
        "resume_from_checkpoint=true"
    ), line
    checkpoint_kib = sum(p.stat().st_size for p in (out / "checkpoint-2").iterdir()) / KIB
    assert 0.9 * checkpoint_kib < parse_needed(line) < 1.5 * checkpoint_kib, line
    assert tree(out / "checkpoint-2") == first  # the earlier checkpoint, byte-identical
    assert not (out / "checkpoint-4").exists() and not (out / "manifest.json").exists()
    assert leftovers(out) == []
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert len(read_train_log(out)) == len(lines) > 0  # whole lines only
    if when == "midway":
        return
    # the advice works: with space again, the run resumes from checkpoint-2 and finishes
    monkeypatch.setattr(callbacks.CheckpointMarkerCallback, "on_save", mark)
    small_disk.empty()
    code, _, err = run_cli("train", train_config, f"output_dir={out}", "save_steps=2", "resume_from_checkpoint=true")
    assert code == 0, err[-3000:]
    assert json.loads((out / "manifest.json").read_text())["training"]["resumed_from"] == str(out / "checkpoint-2")


def test_full_disk_between_checkpoints(small_disk, train_config, run_cli, monkeypatch):
    """Nothing free after checkpoint-2: the next log (TensorBoard's event file, whose writer says only
    'No space left on device', or train_log.jsonl) fails; one line, with the checkpoint to resume from."""
    from lorakit.runfolder import read_train_log
    from lorakit.train import callbacks

    out = small_disk.path / "run"
    mark = callbacks.CheckpointMarkerCallback.on_save

    def fill_after_first_checkpoint(self, args, state, control, **kw):
        mark(self, args, state, control, **kw)
        if state.global_step == 2:
            small_disk.leave(0)

    monkeypatch.setattr(callbacks.CheckpointMarkerCallback, "on_save", fill_after_first_checkpoint)
    code, _, err = run_cli("train", train_config, f"output_dir={out}", "save_steps=2")
    assert code == 2 and "Traceback" not in err, err[-3000:]
    line = error_line(err)
    assert re.fullmatch(
        rf"error: {out}(/train_log\.jsonl)?: no space left on device: needs more than the 0 bytes free on "
        rf"{small_disk.path}; the last complete checkpoint is {out / 'checkpoint-2'}; free some space and resume "
        "with resume_from_checkpoint=true",
        line,
    ), line
    assert (out / "checkpoint-2" / "lorakit_checkpoint.json").is_file() and not (out / "checkpoint-4").exists()
    assert len(read_train_log(out)) == len((out / "train_log.jsonl").read_text().splitlines())
    assert leftovers(out) == []


@pytest.mark.parametrize("said_once", [True, False])
def test_tensorboard_writer_thread_on_a_full_disk_is_not_a_second_traceback(said_once, small_disk):
    """TensorBoard's writer thread dies on a full disk and would print its own traceback; the
    training thread's next TensorBoard call raises the same error (lorakit's one line). Inside the
    trainer's guard the thread's copy is not printed; without it, it is (so this test can fail)."""
    import threading

    from torch.utils.tensorboard import SummaryWriter

    from lorakit.train.trainer import _writer_thread_disk_full_said_once

    printed = []
    previous = threading.excepthook
    threading.excepthook = lambda args: printed.append(args.exc_value)
    try:
        with _writer_thread_disk_full_said_once() if said_once else contextlib.nullcontext():
            writer = SummaryWriter(str(small_disk.path / "runs"))
            small_disk.leave(0)
            with pytest.raises(Exception) as raised:
                for step in range(100_000):
                    writer.add_scalar("train/loss", 1.0, step)
                    writer.flush()
            assert files.is_disk_full(raised.value), raised.value
            writer.close = lambda: None  # its file is gone with the space; nothing to close
    finally:
        threading.excepthook = previous
    if said_once:
        assert printed == []
    else:
        assert printed and files.is_disk_full(printed[0])


@pytest.fixture(scope="module")
def trained_before(tiny_model_dir, tmp_path_factory):
    """A trained adapter folder (4 steps, no checkpoint) to copy where a later run will fail."""
    from lorakit.config import TrainConfig
    from lorakit.train.recipe import train

    folder = tmp_path_factory.mktemp("before")
    data = folder / "data.json"
    data.write_text(
        json.dumps([{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(16)])
    )
    cfg = TrainConfig(
        base_model=str(tiny_model_dir),
        data_path=str(data),
        output_dir=str(folder / "run"),
        batch_size=4,
        micro_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        val_set_size=0,
        save_steps=100,
        precision="fp32",
    )
    train(cfg)
    return folder / "run"


@pytest.mark.parametrize(
    "when, leave",
    [
        ("before", 4 * KIB),
        ("midway", 4 * KIB),  # the first file does not fit
        ("midway", "all but the manifest"),  # every file fits in the staging folder, the manifest does not
    ],
)
def test_adapter_save_on_a_full_disk_keeps_the_earlier_adapter(
    when, leave, small_disk, trained_before, train_config, run_cli, monkeypatch
):
    from lorakit.train import recipe

    out = small_disk.path / "run"
    shutil.copytree(trained_before, out)
    before = adapter_tree(out)
    assert set(before) >= set(ADAPTER_FILES)
    if leave == "all but the manifest":  # what the new run puts in its staging folder, as the last one did
        staged = [
            p.stat().st_size
            for p in out.iterdir()
            if p.is_file() and p.name not in ("manifest.json", "train_log.jsonl")
        ]
        leave = files.bytes_on_disk(staged, out)
    save = recipe.save_verified_adapter
    free = {}

    def fill_then_save(*a, **kw):  # training is done: the disk fills before the adapter is saved
        free["now"] = small_disk.leave(leave)
        return save(*a, **kw)

    monkeypatch.setattr(recipe, "save_verified_adapter", fill_then_save)
    if when == "midway":
        no_precheck(monkeypatch)
    code, _, err = run_cli("train", train_config, f"output_dir={out}", "save_steps=100", "overwrite_output_dir=true")
    line = assert_disk_full(code, err, out, small_disk, free["now"])
    if leave == 4 * KIB:
        assert parse_needed(line) >= 16, line  # the weights alone are 14 KiB
    else:  # the size known beforehand fitted: the line cannot say how much more it took
        assert f"needs more than the {free['now'] / KIB:.1f} KiB free on" in line, line
    assert adapter_tree(out) == before and leftovers(out) == [] and small_disk.free == free["now"]


def test_overwrite_failing_at_the_final_save_leaves_two_consistent_runs(
    small_disk, trained_before, train_config, run_cli, monkeypatch
):
    """overwrite_output_dir on a finished adapter, with checkpoints, then a full disk at the final
    save: the top level is still the earlier adapter with its own config record, and the new run's
    checkpoints say on their own what they were trained with (template, base, config)."""
    import yaml

    from lorakit.data.templates import resolve_template
    from lorakit.train import recipe
    from lorakit.ui.inference import adapter_base

    out = small_disk.path / "run"
    shutil.copytree(trained_before, out)
    before = adapter_tree(out)
    save = recipe.save_verified_adapter

    def fill_then_save(*a, **kw):
        small_disk.leave(4 * KIB)
        return save(*a, **kw)

    monkeypatch.setattr(recipe, "save_verified_adapter", fill_then_save)
    args = (f"output_dir={out}", "save_steps=2", "overwrite_output_dir=true", "prompt_template_name=alpaca_short")
    code, _, err = run_cli("train", train_config, *args)
    assert code == 2, err[-3000:]
    assert adapter_tree(out) == before  # the earlier adapter, its config record included
    assert yaml.safe_load((out / "lorakit_config.yaml").read_text())["prompt_template_name"] == "alpaca"
    assert resolve_template(adapter=out).name == "alpaca"
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "lorakit_checkpoint.json").is_file()
        record = yaml.safe_load((checkpoint / "lorakit_config.yaml").read_text())
        assert record["prompt_template_name"] == "alpaca_short" and record["save_steps"] == 2
        assert resolve_template(adapter=checkpoint).name == "alpaca_short"
        assert adapter_base(checkpoint) == record["base_model"]
    assert leftovers(out) == []


# ---- what a kill leaves ---------------------------------------------------------------------------


def test_a_killed_move_into_place_gives_the_earlier_output_back(tmp_path):
    """Without an atomic swap, move_into_place renames the earlier output aside, then the new one in:
    a kill between the two leaves ``.out.old-PID`` and no ``out``; the next run puts it back."""
    dead = subprocess.Popen(["true"])  # a process id that is gone
    dead.wait()
    out = tmp_path / "merged"
    aside = tmp_path / f".merged.old-{dead.pid}"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"earlier")
    staging = tmp_path / f".merged.merging-{dead.pid}"
    staging.mkdir()
    with files.staged_folder(out, "merging") as new:
        assert (out / "model.safetensors").read_bytes() == b"earlier" and not aside.exists() and not staging.exists()
        (new / "model.safetensors").write_bytes(b"new")
    assert (out / "model.safetensors").read_bytes() == b"new" and leftovers(tmp_path) == []
