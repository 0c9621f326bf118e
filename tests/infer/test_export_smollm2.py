"""Every export format of an adapter on the real default model (smollm2-135m), verified against
lorakit's own answers, as a user runs it; the tiny-model tests check the mechanics, this checks the
thresholds hold on a real model.

Slow (about 5 minutes on 2 cores, llama.cpp's converter once per format): deselected from the
default run (marker ``heavy``), run by .ci/run as its own step: ``python -m pytest -q -m heavy``."""

import json
import os
import subprocess
import sys

import pytest
from random_adapter import make_random_adapter

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'lorakit[gguf]'")

from lorakit.infer import gguf
from lorakit.infer.export import export_hf
from lorakit.infer.verify import THRESHOLDS, VerificationFailed, lorakit_reference, verification_set
from lorakit.runfolder import EXPORT_RECORD, MANIFEST, UNVERIFIED_MARKER

pytestmark = pytest.mark.heavy


@pytest.fixture(autouse=True)
def _llama_cpp_cache(shared_home, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(shared_home))


@pytest.fixture(scope="module")
def adapter(smollm2_path, tmp_path_factory):
    """A small random LoRA on smollm2 (it changes the answers without breaking the model), with a
    lorakit manifest so its exports are recorded there."""
    folder = make_random_adapter(smollm2_path, tmp_path_factory.mktemp("smol") / "persona", std=0.02)
    (folder / MANIFEST).write_text(json.dumps({"base_model": str(smollm2_path), "template": "alpaca"}))
    return folder


@pytest.fixture(scope="module")
def reference(adapter, smollm2_path):
    return lorakit_reference(adapter, str(smollm2_path), verification_set(adapter, None, 12), 24)


# q5_k_m and q6_k are measured by bench/export_fidelity.py; q4_k_m stands for the k-quants here (CI time)
@pytest.mark.parametrize("fmt", ["hf", "f16", "bf16", "q8_0", "q4_k_m", "gguf-lora"])
def test_every_format_is_written_and_verified(fmt, adapter, reference, tmp_path):
    """hf, f16 and the GGUF LoRA are lossless and must pass; bf16 and q8_0 sit near their rule (on
    smollm2 a near-tie can flip one of the answers: bf16 then fails the 95% greedy rule, q8_0 the 97%
    top-1 rule, as on a12 in docs/deploy.md) and must then be kept, marked unverified; k-quants are
    reported."""
    out = tmp_path / fmt
    try:
        if fmt == "hf":
            record = export_hf(adapter, out, reference=reference)
        elif fmt == "gguf-lora":
            record = gguf.export_gguf_lora(adapter, out, reference=reference)
        else:
            record = gguf.export_gguf(adapter, out, quant=fmt, reference=reference)
    except VerificationFailed as e:
        assert fmt in ("bf16", "q8_0"), f"{fmt} must pass: {e}"
        record = e.record
        assert (out / UNVERIFIED_MARKER).is_file() and not record["verified"]
    v = record["verification"]
    min_greedy, min_top1 = THRESHOLDS.get(fmt, THRESHOLDS["f16"])
    assert (v["min_greedy_identical_share"], v["min_top1_agreement"]) == (min_greedy, min_top1)
    assert v["template_identical"] == v["template_checked"] and v["tokens_compared"] > 100
    assert v["passed"] == record["verified"]
    if fmt in ("hf", "f16", "gguf-lora"):
        assert v["top1_agreement"] >= 0.99 and v["mean_kl"] < 1e-3 and record["verified"], v
    if fmt in ("bf16", "q8_0"):
        assert v["top1_agreement"] >= 0.95 and v["mean_kl"] < 0.01, v
    assert v["mean_kl"] >= 0 and 0 <= v["top1_agreement"] <= 1
    saved = json.loads((out / EXPORT_RECORD).read_text())
    assert saved["verified"] == record["verified"] and all(len(f["sha256"]) == 64 for f in saved["files"])


def test_cli_ollama_and_generate_gguf(adapter, tmp_path):
    """As a user: export --to ollama (default q8_0), the figures printed, the Modelfile's TEMPLATE
    the training template's, the export in the adapter's manifest; generate --gguf answers."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    out = tmp_path / "ollama"
    args = ["export", "--adapter", str(adapter), "--to", "ollama", "--out", str(out), "--verify-prompts", "6"]
    r = subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "verified (" in r.stdout and "top-1 agreement" in r.stdout and "ollama create persona" in r.stdout
    modelfile = (out / "Modelfile").read_text()
    assert "### Instruction:" in modelfile and 'PARAMETER stop "### Instruction:"' in modelfile
    exports = json.loads((adapter / MANIFEST).read_text())["exports"]
    assert exports[-1]["format"] == "ollama" and exports[-1]["verified"] is True
    (gguf_file,) = out.glob("*.gguf")
    r = subprocess.run(
        [sys.executable, "-m", "lorakit.cli", "generate", "--gguf", str(gguf_file), "--max-new-tokens", "16", "Hi"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
