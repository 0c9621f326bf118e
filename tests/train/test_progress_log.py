"""train_log.jsonl says where a run is: step, total_steps, elapsed_s and remaining_s (the UI reads
its progress from these, not from the progress bar's text)."""

import pytest
from test_recipe import cfg_for  # tests/train is on sys.path (rootdir import mode)

from lorakit.runfolder import read_train_log
from lorakit.train.callbacks import JsonlLogCallback
from lorakit.train.recipe import train


def test_every_record_has_the_total_and_the_time_left(tiny_model_dir, tmp_path):
    train(cfg_for(tiny_model_dir, tmp_path, max_steps=4))
    records = read_train_log(tmp_path / "out")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in records:
        assert r["total_steps"] == 4
        assert isinstance(r["elapsed_s"], float) and r["elapsed_s"] >= 0
        assert r["remaining_s"] is None or r["remaining_s"] >= 0
    assert all(isinstance(r["remaining_s"], float) for r in steps)
    assert steps[-1]["remaining_s"] == 0.0


def test_remaining_time_counts_only_the_steps_this_process_did(tmp_path, monkeypatch):
    """A resumed run starts at step 50 of 100: after 10 steps in 20 s, 40 steps are left at
    2 s each (not 20 s / 60 steps as if the first 50 had been done just now)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    clock = {"t": 1000.0}
    monkeypatch.setattr("lorakit.train.callbacks.time.time", lambda: clock["t"])
    cb = JsonlLogCallback(tmp_path)
    state, control = TrainerState(), TrainerControl()
    state.global_step, state.max_steps, state.epoch = 50, 100, 1.0
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    cb.on_train_begin(args, state, control)
    cb.on_log(args, state, control, logs={"eval_loss": 1.0})  # before a step of its own: no estimate
    state.global_step = 60
    clock["t"] += 20.0
    cb.on_log(args, state, control, logs={"loss": 1.5})
    first, second = read_train_log(tmp_path)
    assert first["remaining_s"] is None and first["total_steps"] == 100 and first["step"] == 50
    assert (second["step"], second["total_steps"], second["elapsed_s"]) == (60, 100, 20.0)
    assert second["remaining_s"] == pytest.approx(80.0)
