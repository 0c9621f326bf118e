"""End to end on the real default model (smollm2-135m): train a few steps on real Chinese
Alpaca data, save (verified), generate, merge, and check merge == base + adapter."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def lorakit(*args, cwd, env=None):
    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *args], cwd=cwd, env=run_env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_datasets, smollm2_path):
    work = tmp_path_factory.mktemp("e2e")
    subset = work / "zh.json"
    records = json.loads((shared_datasets / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    subset.write_text(json.dumps(records[:64], ensure_ascii=False), encoding="utf-8")
    (work / "cfg.yaml").write_text(
        f"base_model: {smollm2_path}\ndata_path: {subset}\noutput_dir: out\n"
        "batch_size: 4\nmicro_batch_size: 4\nmax_steps: 6\nlearning_rate: 1e-3\ncutoff_len: 128\n"
        "val_set_size: 4\neval_steps: 3\nsave_steps: 3\nlogging_steps: 1\n",
        encoding="utf-8",
    )
    r = lorakit("train", "cfg.yaml", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work


def test_training_output_is_verified(trained):
    out = trained / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["global_steps"] == 6
    assert manifest["verification"]["max_logit_diff"] <= 1e-4
    assert manifest["data"]["format"] == "alpaca" and manifest["template"] == "alpaca"
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 6 and all(0 < x < 20 for x in losses)


def test_generate_merge_same_greedy_answer(trained):
    q = "请用一句话介绍北京。"
    tuned = lorakit("generate", "--adapter", "out", "--max-new-tokens", "24", q, cwd=trained)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert tuned.stdout.strip()
    m = lorakit("merge", "--adapter", "out", "--out", "merged", cwd=trained)
    assert m.returncode == 0, m.stderr[-2000:]
    merged = lorakit("generate", "--base", "merged", "--max-new-tokens", "24", q, cwd=trained)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert merged.stdout == tuned.stdout


def test_merged_logits_match_base_plus_adapter(trained, smollm2_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (trained / "merged").is_dir():  # run on its own: merge here
        m = lorakit("merge", "--adapter", "out", "--out", "merged", cwd=trained)
        assert m.returncode == 0, m.stderr[-2000:]
    tok = AutoTokenizer.from_pretrained(trained / "merged")
    ids = tok("Below is an instruction. 你好，世界", return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(trained / "merged")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path), str(trained / "out"))
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max()
    assert diff < 1e-3, diff
