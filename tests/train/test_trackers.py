"""report_to: mlflow and wandb through the transformers Trainer's integrations, offline.

Each gets the training logs (loss, eval loss, mean LoRA norms, tokens/s), the per-layer LoRA
norms and, at the end, the manifest's figures. The runs are read back from their local files.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_recipe import cfg_for  # tests/train is on sys.path (rootdir import mode)

from lorakit.errors import ConfigError
from lorakit.train.recipe import LoraFinetune, train
from lorakit.train.trackers import manifest_figures

LAYER_METRIC = "lora_norms/model.layers.0.self_attn.q_proj/BA"


def tracked_cfg(tiny_model_dir, tmp_path, **kw):
    # 3 steps, eval at step 2 and once more after training (step 3 is not an eval step)
    return cfg_for(
        tiny_model_dir, tmp_path, max_steps=3, eval_steps=2, save_steps=2, load_best_model_at_end=False, **kw
    )


# ---- mlflow -----------------------------------------------------------------------------------


def test_mlflow_run_has_losses_per_layer_norms_and_manifest_figures(tiny_model_dir, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[mlflow]')")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database otherwise
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lorakit-test")
    manifest = train(tracked_cfg(tiny_model_dir, tmp_path, report_to=["mlflow"]))
    assert mlflow.active_run() is None  # lorakit closed the run it kept open for the summary

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lorakit-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the eval after training must not open a run of its own"
    run = runs[0]
    assert run.info.status == "FINISHED"
    m, params = run.data.metrics, run.data.params

    # the Trainer's logs, with lorakit's scalars
    assert [x.step for x in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert {"learning_rate", "tokens_per_s", "lora_A_norm", "lora_B_norm", "lora_BA_norm"} <= set(m)
    assert [x.step for x in client.get_metric_history(run.info.run_id, "eval_loss")] == [2, 3]
    # per-layer norms, at each training log's step
    per_layer = client.get_metric_history(run.info.run_id, LAYER_METRIC)
    assert [x.step for x in per_layer] == [1, 2, 3] and all(x.value > 0 for x in per_layer)
    assert sum(k.startswith("lora_norms/") for k in m) == 2 * 2 * 3  # 2 layers x (q, v) x (A, B, BA)
    # the manifest's figures
    t = manifest["training"]
    assert m["training/train_loss"] == pytest.approx(t["train_loss"])
    assert m["training/eval_loss"] == pytest.approx(t["eval_loss"])
    assert m["training/tokens_per_s"] == pytest.approx(t["tokens_per_s"])
    assert m["training/wall_s"] == pytest.approx(t["wall_s"])
    assert m["training/global_steps"] == 3
    assert m["parameters/trainable"] == manifest["parameters"]["trainable"]
    assert params["lorakit/base_model"] == str(tiny_model_dir)
    assert params["lorakit/lora/r"] == str(manifest["lora"]["r"])
    assert params["lorakit/data/sha256"] == manifest["data"]["sha256"]


# ---- wandb ------------------------------------------------------------------------------------


def wandb_records(path: Path):
    """The records of an offline run's .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:8]
    pos, chunk = 7, b""  # 7-byte header: ":W&B", magic, version
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the tail of a block too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def test_wandb_offline_run_has_losses_per_layer_norms_and_manifest_figures(tiny_model_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    # Alpaca-LoRA's key: wandb_project alone turns W&B on
    manifest = train(tracked_cfg(tiny_model_dir, tmp_path, wandb_project="lorakit-test", report_to=[]))
    assert wandb.run is None  # finished after the summary
    wandb.teardown()  # the wandb-core service finishes writing the run's file
    monkeypatch.delenv("WANDB_PROJECT", raising=False)  # recipe set it (setdefault) for the run

    files = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert len(files) == 1, files
    history, summary, config = [], {}, {}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "run":
            assert record.run.project == "lorakit-test"

    losses = [(h["train/global_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert [step for step, _ in losses] == [1, 2, 3]
    assert all("train/tokens_per_s" in h and "train/lora_BA_norm" in h for h in history if "train/loss" in h)
    assert [h["train/global_step"] for h in history if "eval/loss" in h] == [2, 3]
    per_layer = [(h["train/global_step"], h[LAYER_METRIC]) for h in history if LAYER_METRIC in h]
    assert [step for step, _ in per_layer] == [1, 2, 3] and all(v > 0 for _, v in per_layer)

    t = manifest["training"]
    assert summary["training/train_loss"] == pytest.approx(t["train_loss"])
    assert summary["training/eval_loss"] == pytest.approx(t["eval_loss"])
    assert summary["training/tokens_per_s"] == pytest.approx(t["tokens_per_s"])
    assert summary["training/wall_s"] == pytest.approx(t["wall_s"])
    assert summary["parameters/trainable"] == manifest["parameters"]["trainable"]
    assert LAYER_METRIC in summary  # the last value of each history key
    assert config["lorakit/base_model"] == str(tiny_model_dir)


# ---- the figures, and backends that are not there ---------------------------------------------


def test_manifest_figures_are_metrics_and_settings_are_params():
    manifest = {
        "lorakit_version": "0.1.0",
        "created": "2026-01-01T00:00:00+00:00",
        "base_model": "m",
        "data": {"path": "d.json", "sha256": "ab", "records": 10},
        "precision": "fp32",
        "parameters": {"trainable": 100, "total": 1000},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "train_loss": 1.5,
            "eval_loss": None,
            "wall_s": 2.0,
            "tokens_per_s": 50.0,
            "best_checkpoint": None,
            "peak_memory_kind": "process_rss",
        },
        "verification": {"max_logit_diff": 0.0, "tensors": 8},
        "eval": {"report": "out/eval/report.json", "scores": {"adapter": {"test": {"bleu": 12.5, "loss": 0.9}}}},
        "libraries": {"torch": "2"},
    }
    metrics, params = manifest_figures(manifest)
    assert metrics == {
        "parameters/trainable": 100.0,
        "parameters/total": 1000.0,
        "training/train_loss": 1.5,
        "training/wall_s": 2.0,
        "training/tokens_per_s": 50.0,
        "verification/max_logit_diff": 0.0,
        "verification/tensors": 8.0,
        "eval/scores/adapter/test/bleu": 12.5,
        "eval/scores/adapter/test/loss": 0.9,
    }
    assert params == {
        "lorakit_version": "0.1.0",
        "base_model": "m",
        "data/path": "d.json",
        "data/sha256": "ab",
        "data/records": "10",
        "precision": "fp32",
        "lora/r": "8",
        "lora/alpha": "16",
        "lora/target_modules": "q_proj,v_proj",
        "training/peak_memory_kind": "process_rss",
        "eval/report": "out/eval/report.json",
    }


def lorakit_train(tmp_path, tiny_model_dir, *overrides, pythonpath=None):
    from test_recipe import make_data

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    (tmp_path / "c.yaml").write_text(
        f"base_model: {tiny_model_dir}\ndata_path: {make_data(tmp_path)}\n"
        "output_dir: out\nbatch_size: 2\nmicro_batch_size: 2\nmax_steps: 1\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", "train", "c.yaml", *overrides],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_error_line(r, *needles):
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0]


def test_unknown_tracker_is_one_error_line_before_any_model(tmp_path, tiny_model_dir):
    r = lorakit_train(tmp_path, tiny_model_dir, "report_to=neptune")
    assert_one_error_line(r, "report_to")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "backend, settings, key",
    [
        ("mlflow", {"report_to": ["mlflow"]}, "report_to"),
        ("wandb", {"report_to": ["wandb"]}, "report_to"),
        ("wandb", {"wandb_project": "p"}, "wandb_project"),
    ],
)
def test_uninstalled_tracker_fails_the_check(tmp_path, tiny_model_dir, monkeypatch, backend, settings, key):
    monkeypatch.setitem(sys.modules, backend, None)  # find_spec(name) is None: as if not installed
    run = LoraFinetune(cfg_for(tiny_model_dir, tmp_path, **settings))
    needle = rf"^{key}: {backend} is not installed \(pip install 'lorakit\[{backend}\]'\)"
    with pytest.raises(ConfigError, match=needle):
        run.check()  # step 1: before any data, tokenizer or model is loaded


def test_uninstalled_tracker_is_one_error_line_before_any_model(tmp_path, tiny_model_dir):
    # sys.modules["mlflow"] = None in the CLI process: find_spec("mlflow") is None, as when not installed
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    r = lorakit_train(tmp_path, tiny_model_dir, "report_to=mlflow", pythonpath=hide)
    assert_one_error_line(r, "report_to: mlflow is not installed", "lorakit[mlflow]")
    assert not (tmp_path / "out").exists()
