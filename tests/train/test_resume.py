"""kill -9 in the middle of a run, then resume: the same adapter and eval loss as a run that was
never interrupted (same seed). Optimizer, scheduler, RNG (dropout) and data position all come
back from the checkpoint; a checkpoint the killed process was still writing is never used."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from lorakit.runfolder import CHECKPOINT_MARKER


def lorakit_cmd(*args):
    return [sys.executable, "-m", "lorakit.cli", *args]


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    data = tmp_path / "data.json"
    data.write_text(
        json.dumps(
            [{"instruction": f"Add {i} and {i + 3}.", "input": "", "output": str(2 * i + 3)} for i in range(48)]
        )
    )
    (tmp_path / "cfg.yaml").write_text(
        f"base_model: {tiny_model_dir}\ndata_path: {data}\nbatch_size: 4\nmicro_batch_size: 2\n"
        "max_steps: 40\nlearning_rate: 1.0e-2\nlr_scheduler_type: cosine\nwarmup_steps: 3\n"
        "lora_dropout: 0.1\nval_set_size: 8\neval_steps: 10\nsave_steps: 10\nsave_total_limit: 2\n"
        "logging_steps: 1\nprecision: fp32\nseed: 7\nload_best_model_at_end: false\n"
    )
    return tmp_path


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.01)


def test_kill_9_then_resume_matches_an_uninterrupted_run(run_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref = subprocess.run(
        lorakit_cmd("train", "cfg.yaml", "output_dir=ref"),
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(
        lorakit_cmd("train", "cfg.yaml", "output_dir=run"),
        cwd=run_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(run_dir / "run" / "checkpoint-20" / CHECKPOINT_MARKER, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run = run_dir / "run"
    assert not (run / "manifest.json").exists()

    # The process may have died while writing a checkpoint; make sure there is one such
    # half-written checkpoint, newer than the last complete one, which resume must never use.
    partial = run / "checkpoint-35"
    shutil.copytree(run / "checkpoint-20", partial)
    (partial / CHECKPOINT_MARKER).unlink()
    (partial / "optimizer.pt").write_bytes(b"truncated")

    resumed = subprocess.run(
        lorakit_cmd("train", "cfg.yaml", "output_dir=run", "resume_from_checkpoint=true"),
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not partial.exists()

    m_ref = json.loads((run_dir / "ref" / "manifest.json").read_text())
    m_run = json.loads((run / "manifest.json").read_text())
    assert m_run["training"]["resumed_from"].endswith("checkpoint-20") or m_run["training"]["resumed_from"].endswith(
        "checkpoint-30"
    )
    assert m_run["training"]["global_steps"] == m_ref["training"]["global_steps"] == 40
    # Same seed, same data order, restored RNG: CPU fp32 kernels are deterministic, so the
    # runs agree far inside the 1e-3 the issue asks for.
    assert abs(m_run["training"]["eval_loss"] - m_ref["training"]["eval_loss"]) < 1e-3
    a = load_file(str(run_dir / "ref" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(
        f"resume vs uninterrupted: eval loss diff "
        f"{abs(m_run['training']['eval_loss'] - m_ref['training']['eval_loss']):.3g}, max adapter diff {worst:.3g}"
    )
    assert worst < 1e-5, worst
    # the log holds each step once: lines the killed run wrote after its checkpoint are dropped
    steps = [
        json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines() if "loss" in json.loads(x)
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_resume_refuses_a_half_written_checkpoint_by_path(run_dir, tiny_model_dir):
    from lorakit.config import load_config
    from lorakit.errors import ConfigError
    from lorakit.train.recipe import LoraFinetune

    bad = run_dir / "out" / "checkpoint-10"
    bad.mkdir(parents=True)
    (bad / "trainer_state.json").write_text("{}")
    cfg = load_config(
        run_dir / "cfg.yaml", ["output_dir=" + str(run_dir / "out"), "resume_from_checkpoint=" + str(bad)]
    )
    with pytest.raises(ConfigError, match="not completely written"):
        LoraFinetune(cfg).check()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        LoraFinetune(
            load_config(run_dir / "cfg.yaml", ["output_dir=" + str(run_dir / "out"), "resume_from_checkpoint=true"])
        ).check()
