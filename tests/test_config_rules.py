"""The config rules seen from the UI form: its values become a TrainConfig through the same
validation as `lorakit train`, so the page refuses what the command line refuses, and its
defaults (a checkpoint every 50 steps) make a valid config with a validation set too."""

from __future__ import annotations

import json

import pytest

from lorakit.config import TrainConfig, load_config
from lorakit.errors import ConfigError
from lorakit.ui.training import build_config, form_defaults, prepare_run
from lorakit.ui.workdir import Workdir


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}] * 8), encoding="utf-8")
    return path


@pytest.mark.parametrize("val_set_size", [0, 2, 0.1, 2.0])
def test_form_defaults_with_validation_make_a_valid_config(tmp_path, data_file, val_set_size):
    values = {**form_defaults(), "val_set_size": val_set_size}
    cfg = build_config(values, data_file, tmp_path / "out")
    assert cfg.save_steps % cfg.eval_steps == 0
    assert cfg.check_for_training("settings") is cfg


def test_prepare_run_with_validation_writes_a_config_the_cli_accepts(tmp_path, data_file):
    workdir = Workdir(tmp_path / "workdir")
    run = prepare_run(workdir, {**form_defaults(), "val_set_size": 2, "max_steps": 5}, data_file, name="v")
    cfg = load_config(run.config_path)  # what `lorakit train train.yaml` reads, data_path rule included
    assert cfg.val_set_size == 2 and cfg.save_steps % cfg.eval_steps == 0


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"val_set_size": 2, "save_steps": 30, "eval_steps": 20}, ["save_steps (30)", "eval_steps (20)"]),
        ({"batch_size": 10, "micro_batch_size": 4}, ["batch_size (10)", "micro_batch_size (4)"]),
    ],
)
def test_form_refuses_a_bad_combination_in_one_line(data_file, tmp_path, change, needles):
    assert set(change) <= set(form_defaults())  # the form has every field the case changes
    with pytest.raises(ConfigError) as info:
        build_config({**form_defaults(), **change}, data_file, tmp_path / "out")
    message = str(info.value)
    assert message.startswith("settings: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_a_config_without_data_is_refused_for_training_only():
    cfg = TrainConfig(**{k: v for k, v in form_defaults().items()})
    assert cfg.data_path == ""  # the form's defaults, config-help: a config without data is fine
    with pytest.raises(ConfigError, match=r"^settings: data_path: required \(a \.json"):
        cfg.check_for_training("settings")
