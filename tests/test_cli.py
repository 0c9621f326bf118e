"""The `lorakit` command's user-facing contract, through the real console script in a subprocess:
every user mistake exits 2 with exactly one stderr line "error: ..." that names the file, record
or key, and never a traceback; --help works for every command; `data check` reports real data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "COLUMNS": "200",
        # an empty model cache: nothing here may find or pull a cached model by accident
        "LORAKIT_HOME": str(tmp_path_factory.mktemp("lorakit-home")),
    }


def lorakit(*args, cwd, env, script=None, timeout=300) -> subprocess.CompletedProcess:
    command = [script] if script else [sys.executable, "-m", "lorakit.cli"]
    return subprocess.run(
        [*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one stderr line "error: ..." containing every needle, no traceback anywhere."""
    everything = r.stdout + r.stderr
    assert "Traceback" not in everything, everything[-3000:]
    assert r.returncode == 2, (r.returncode, everything[-3000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


# ---- files ---------------------------------------------------------------------------------

GOOD = [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say bye.", "output": "bye"}]

DATA_FILES = {
    # line 2 lacks the comma between the two fields: json names line 2, column 22
    "bad.json": b'[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]\n',
    "bad.jsonl": b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output"\n',
    "missing.json": b'[{"instruction": "a", "output": "b"}, {"instruction": "x"}]',
    "nonstr.json": b'[{"instruction": "a", "output": "b"}, {"instruction": "x", "output": 5}]',
    "empty.json": b"[]",
    "latin1.json": '[{"instruction": "café", "output": "b"}]'.encode("latin-1"),
    "object.json": b'{"instruction": "a", "output": "b"}',
    "data.txt": b"instruction: a\noutput: b\n",
    "good.json": json.dumps(GOOD).encode(),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    for name, data in DATA_FILES.items():
        (folder / name).write_bytes(data)
    base = (
        f"base_model: {tiny_model_dir}\ndata_path: good.json\noutput_dir: out\n"
        "batch_size: 2\nmicro_batch_size: 2\nmax_steps: 1\n"
    )
    configs = {
        "ok.yaml": base,
        "unknown.yaml": base + "lora_rank: 8\n",
        "targets.yaml": base + "lora_target_modules: [q_proj, qkv_proj]\n",
        "broken.yaml": base + "lora_target_modules: [q_proj, v_proj\n",
        "q4.yaml": base + "load_in_4bit: true\n",
        "fp16.yaml": base + "precision: fp16\n",
    }
    for name, text in configs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


# ---- lorakit data check: bad data ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, needles",
    [
        pytest.param("bad.json", ["bad.json: ", "invalid JSON at line 2 column 22"], id="malformed-json"),
        pytest.param("bad.jsonl", ["bad.jsonl: line 2: ", "invalid JSON"], id="malformed-jsonl-line"),
        pytest.param("missing.json", ["missing.json: record 1: ", "missing field 'output'"], id="missing-field"),
        pytest.param("nonstr.json", ["nonstr.json: record 1: ", "'output' must be a string"], id="non-string-field"),
        pytest.param("empty.json", ["empty.json: ", "no records"], id="empty-list"),
        pytest.param("latin1.json", ["latin1.json: ", "UTF-8", "0xe9"], id="non-utf8"),
        pytest.param("object.json", ["object.json: ", "expected a JSON list", "object"], id="top-level-object"),
        pytest.param("nosuch.json", ["nosuch.json: ", "not found"], id="missing-file"),
        pytest.param("data.txt", ["data.txt: ", "'.txt'", ".jsonl"], id="unknown-extension"),
    ],
)
def test_data_check_bad_data_is_one_line(work, env, tiny_model_dir, name, needles):
    r = lorakit("data", "check", name, "--base", tiny_model_dir, cwd=work, env=env)
    assert_user_error(r, *needles)


# ---- lorakit train: bad configs, checked before any training ----------------------------------


@pytest.mark.parametrize(
    "config, overrides, needles",
    [
        pytest.param(
            "unknown.yaml",
            [],
            ["unknown.yaml: ", "unknown key 'lora_rank'", "known keys:", "lora_r,"],
            id="unknown-key",
        ),
        pytest.param("ok.yaml", ["lora_r=0"], ["ok.yaml: ", "lora_r", "got 0"], id="lora_r=0"),
        pytest.param(
            "ok.yaml",
            ["batch_size=6", "micro_batch_size=4"],
            ["ok.yaml: ", "batch_size (6)", "micro_batch_size (4)"],
            id="batch-not-multiple",
        ),
        pytest.param(
            "targets.yaml", [], ["lora_target_modules", "qkv_proj", *MODULES, "all-linear"], id="bad-target-module"
        ),
        pytest.param("broken.yaml", [], ["broken.yaml: ", "invalid YAML", "line "], id="invalid-yaml"),
        pytest.param("nosuch.yaml", [], ["nosuch.yaml: ", "not found"], id="missing-config"),
        pytest.param("ok.yaml", ["data_path=bad.json"], ["bad.json: ", "line 2 column 22"], id="malformed-data"),
        pytest.param(
            "q4.yaml",
            [],
            ["load_in_4bit"],
            id="load_in_4bit-no-cuda",
            marks=pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA"),
        ),
        pytest.param(
            "fp16.yaml",
            [],
            ["precision", "fp16", "CUDA"],
            id="fp16-no-cuda",
            marks=pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA"),
        ),
        pytest.param("ok.yaml", ["base_model=./no/such/dir"], ["./no/such/dir"], id="no-such-base-model"),
    ],
)
def test_train_bad_config_is_one_line(work, env, config, overrides, needles):
    r = lorakit("train", config, *overrides, cwd=work, env=env)
    assert_user_error(r, *needles)
    assert not (work / "out").exists(), "a failed check must not create output_dir"


# ---- --help ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["train"],
        ["generate"],
        ["chat"],
        ["merge"],
        ["demo"],
        ["config-help"],
        ["data"],
        ["data", "check"],
        ["models"],
        ["models", "pull"],
        ["models", "list"],
    ],
    ids=lambda c: " ".join(c) or "lorakit",
)
def test_help_exits_0(tmp_path, env, command):
    r = lorakit(*command, "--help", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Usage" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_installed_console_script(tmp_path, env):
    script = Path(sys.executable).parent / ("lorakit.exe" if os.name == "nt" else "lorakit")
    if not script.exists():
        pytest.skip(f"console script not installed beside {sys.executable}")
    r = lorakit("--help", cwd=tmp_path, env=env, script=script)
    assert r.returncode == 0, r.stdout + r.stderr
    for command in ("train", "generate", "chat", "merge", "demo", "config-help", "data", "models"):
        assert command in r.stdout
    # main() turns a user error into one line through the script too
    r = lorakit("data", "check", "nosuch.json", "--base", "x", cwd=tmp_path, env=env, script=script)
    assert_user_error(r, "nosuch.json: ", "not found")


# ---- lorakit data check on the real data ---------------------------------------------------


@pytest.mark.parametrize("name, records", [("alpaca_zh_demo.json", 1000), ("alpaca_en_demo.json", 999)])
def test_data_check_real_data(shared_datasets, tiny_model_dir, env, tmp_path, name, records):
    r = lorakit(
        "data", "check", shared_datasets / name, "--base", tiny_model_dir, "--cutoff-len", 64, cwd=tmp_path, env=env
    )
    out = r.stdout
    assert r.returncode == 0, (out + r.stderr)[-3000:]
    assert "Traceback" not in out + r.stderr
    assert f"records: {records} (" in out
    assert "format: alpaca" in out.splitlines()
    pcts = re.search(r"tokens per example: p50 (\d+), p90 (\d+), p95 (\d+), p99 (\d+), max (\d+)", out)
    assert pcts, out
    values = [int(v) for v in pcts.groups()]
    assert values[0] > 0 and values == sorted(values)  # percentiles rise to the max
    over = re.search(r"over cutoff_len=64: (\d+) \(", out)
    assert over, out
    assert 0 < int(over.group(1)) <= records


# ---- lorakit train: rules across keys refuse the config before any data or model is read -----------


@pytest.mark.parametrize(
    "text, overrides, needles",
    [
        pytest.param("lora_r: 16\n", [], ["cfg.yaml: data_path: required (a .json"], id="no-data_path"),
        pytest.param(
            "data_path: nosuch.json\n",
            ["early_stopping_patience=2"],
            ["cfg.yaml: early_stopping_patience (2) needs a validation set", "val_set_size"],
            id="early-stopping-without-validation",
        ),
        pytest.param(
            "data_path: nosuch.json\nval_set_size: 4\nsave_steps: 30\neval_steps: 20\n",
            [],
            ["cfg.yaml: save_steps (30) must be a multiple of eval_steps (20)"],
            id="steps-conflict",
        ),
        pytest.param(
            "data_path: nosuch.json\n",
            ["batch_size=6", "micro_batch_size=4"],
            ["cfg.yaml: batch_size (6)", "micro_batch_size (4)"],
            id="batch-not-multiple",
        ),
    ],
)
def test_train_rule_across_keys_fails_before_anything_loads(tmp_path, env, text, overrides, needles):
    # the base model and the data do not exist: a line about them would mean they were looked at first
    (tmp_path / "cfg.yaml").write_text("base_model: ./no/such/model\noutput_dir: out\n" + text, encoding="utf-8")
    r = lorakit("train", "cfg.yaml", *overrides, cwd=tmp_path, env=env)
    line = assert_user_error(r, *needles)
    assert "no/such/model" not in line and "loading" not in r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


def test_train_only_save_steps_set_evaluation_follows(tmp_path, env):
    """save_steps alone with a validation set is no error: the run gets past the config (to the
    missing base model), evaluation following the save interval."""
    (tmp_path / "cfg.yaml").write_text(
        "base_model: ./no/such/model\ndata_path: d.json\nval_set_size: 1\nsave_steps: 30\n", encoding="utf-8"
    )
    (tmp_path / "d.json").write_text(json.dumps(GOOD), encoding="utf-8")
    r = lorakit("train", "cfg.yaml", cwd=tmp_path, env=env)
    assert_user_error(r, "./no/such/model")
