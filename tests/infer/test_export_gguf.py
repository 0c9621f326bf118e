"""lorakit export --to gguf / gguf-lora with llama.cpp's own converter and quantizer, checked by
llama.cpp (llama-cpp-python) against lorakit's own answers.

The model is a tiny random Llama with smollm2's tokenizer: convert_hf_to_gguf.py identifies a BPE
tokenizer by the hash of its ids on a probe text and refuses unknown ones ("BPE pre-tokenizer was
not recognized"), which the conftest's freshly trained 512-token BPE is; smollm2's is known to it.
llama.cpp's convert scripts come from LORAKIT_LLAMA_CPP, else from the installed llama-cpp-python's
sdist, fetched once into the shared test cache."""

import json
import shutil

import pytest
from random_adapter import make_random_adapter
from tiny_models import build_tiny_smol_model

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'lorakit[gguf]'")
pytest.importorskip("sentencepiece", reason="llama.cpp's converter needs sentencepiece: pip install 'lorakit[gguf]'")

from gguf import GGUFReader

from lorakit.data.templates import resolve_template
from lorakit.infer import gguf as gguf_mod
from lorakit.infer.export import ExportError, export_chat_template
from lorakit.infer.gguf import export_gguf, export_gguf_lora
from lorakit.infer.verify import VerificationFailed, verification_set
from lorakit.runfolder import EXPORT_RECORD, MANIFEST, UNVERIFIED_MARKER

# a random model's logits have near-ties among 49152 tokens, which f16 rounding (llama.cpp also keeps an
# f16 KV cache) flips after a few tokens; short answers keep the check about the weights and the prompt
NEW_TOKENS = 8


@pytest.fixture(autouse=True)
def _llama_cpp_cache(shared_home, monkeypatch):
    """llama.cpp's sources are fetched once per machine, into the shared test cache."""
    monkeypatch.setenv("LORAKIT_HOME", str(shared_home))


@pytest.fixture(scope="module")
def gguf_model(smollm2_path, tmp_path_factory):
    """A 2-layer random Llama (hidden 64) with smollm2's tokenizer."""
    return build_tiny_smol_model(tmp_path_factory.mktemp("tiny-smol"), smollm2_path)


@pytest.fixture(scope="module")
def adapter(gguf_model, tmp_path_factory):
    return make_random_adapter(gguf_model, tmp_path_factory.mktemp("gguf-adapter"))


def _leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _prompts(adapter, n=8):
    return verification_set(adapter, None, n)


@pytest.mark.heavy  # llama.cpp conversion and its check, 15-25 s each: the heavy step of .ci/run
@pytest.mark.parametrize("quant", ["f16", "f32"])
def test_f16_export_verifies_and_carries_the_training_template(adapter, gguf_model, tmp_path, quant):
    from transformers import AutoTokenizer

    out = tmp_path / quant
    record = export_gguf(adapter, out, quant=quant, vset=_prompts(adapter), new_tokens=NEW_TOKENS)
    name = f"{adapter.name}-{quant}.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted([name, EXPORT_RECORD])
    assert record["gguf_file"] == name and record["verified"] and record["files"][0]["name"] == name
    v = record["verification"]
    assert v["passed"] and v["top1_agreement"] >= 0.99 and v["tokens_compared"] > 0, v
    assert v["greedy_identical"] >= 0.95 * v["prompts"], v["differences"]
    assert 0 <= v["mean_kl"] < 0.01 and v["template_identical"] == v["template_checked"]
    assert v["tokens_per_s"] > 0 and "llama.cpp" in v["runtime"]
    tok = AutoTokenizer.from_pretrained(gguf_model)
    template = resolve_template(adapter=adapter, tokenizer=tok)
    reader = GGUFReader(str(out / name))
    assert reader.get_field("tokenizer.chat_template").contents() == export_chat_template(template, tok)
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == tok.eos_token_id
    saved = json.loads((out / EXPORT_RECORD).read_text())
    assert saved["verification"] == v and saved["versions"]["llama-cpp-python"]
    assert _leftovers(out) == []


@pytest.mark.heavy  # about 40 s: a .ci/run step of its own, so the README's command keeps its margin
def test_q4_k_m_is_smaller_and_only_reported(adapter, tmp_path, capfd):
    # hidden size 64 is below a k-quant's 256-wide blocks (llama.cpp falls back to other types) and random
    # weights answer noise: a k-quant's figures are reported, never a failure unless --min-top1 is set
    f16 = export_gguf(adapter, tmp_path / "f16", quant="f16", verify=False)
    q4 = export_gguf(adapter, tmp_path / "q4", quant="q4_k_m", vset=_prompts(adapter, 4), new_tokens=NEW_TOKENS)
    assert q4["files"][0]["bytes"] < f16["files"][0]["bytes"] and q4["quantizer"]
    v = q4["verification"]
    assert q4["verified"] and v["min_top1_agreement"] is None and v["min_greedy_identical_share"] is None
    assert 0.0 <= v["top1_agreement"] <= 1.0 and v["mean_kl"] >= 0 and v["prompts"] == 4
    assert GGUFReader(str(tmp_path / "q4" / q4["gguf_file"])).get_field("general.file_type").contents() == 15
    # width 64: llama.cpp writes other types than q4_K, and the record says so; its per-tensor log
    # stays off the user's terminal
    assert "tensors fell back to" in q4["quantizer_fallback"], q4["quantizer_fallback"]
    assert "llama_model_quantize_impl" not in capfd.readouterr().err


@pytest.mark.heavy  # llama.cpp conversion and its check, 15-25 s each: the heavy step of .ci/run
def test_gguf_lora_exports_and_verifies(adapter, tmp_path):
    out = tmp_path / "lora"
    record = export_gguf_lora(adapter, out, vset=_prompts(adapter), new_tokens=NEW_TOKENS)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [EXPORT_RECORD, f"{adapter.name}-lora-f16.gguf", record["base_gguf_file"]]
    )
    assert GGUFReader(str(out / record["lora_file"])).get_field("adapter.type").contents() == "lora"
    v = record["verification"]
    assert record["verified"] and v["top1_agreement"] >= 0.99 and v["greedy_identical"] >= 0.95 * v["prompts"], v
    assert [f["name"] for f in record["files"]] == [record["lora_file"], record["base_gguf_file"]]


def test_dora_is_refused(adapter, tmp_path):
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ExportError, match="DoRA.*--to gguf"):
        export_gguf_lora(dora, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.heavy  # llama.cpp conversion and its check, 15-25 s each: the heavy step of .ci/run
def test_a_failed_check_keeps_the_file_marked_unverified(adapter, tmp_path, monkeypatch):
    real = gguf_mod.llama_cpp_answers

    def wrong(*args, **kwargs):
        answers, streams, tps = real(*args, **kwargs)
        return [a + " (changed)" for a in answers], streams, tps

    monkeypatch.setattr(gguf_mod, "llama_cpp_answers", wrong)
    out = tmp_path / "out"
    with pytest.raises(VerificationFailed, match=r"greedy answers identical 0/3 .*kept at .*unverified"):
        export_gguf(adapter, out, quant="f16", vset=_prompts(adapter, 3), new_tokens=NEW_TOKENS)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{adapter.name}-f16-UNVERIFIED.gguf", EXPORT_RECORD, UNVERIFIED_MARKER]
    )
    saved = json.loads((out / EXPORT_RECORD).read_text())
    assert saved["verified"] is False and saved["gguf_file"].endswith("-UNVERIFIED.gguf")
    assert _leftovers(out) == []


@pytest.mark.heavy  # a .ci/run step of its own (pyproject: markers)
def test_cli_min_top1_fails_with_exit_1_and_records_it(adapter, tmp_path):
    """--min-top1 above what a q4_k_m of a random model reaches: exit 1, one error line with the figures,
    the file kept as *-UNVERIFIED.gguf, the export in the adapter's manifest as unverified."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(adapter, run)
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    (run / MANIFEST).write_text(json.dumps({"base_model": base, "template": "alpaca"}))
    out = tmp_path / "q4"
    args = ["--adapter", run, "--to", "gguf", "--quant", "q4_k_m", "--min-top1", "1", "--verify-prompts", "4"]
    r = subprocess.run(
        [sys.executable, "-m", "lorakit.cli", "export", *map(str, args), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "top-1 agreement" in errors[0] and "below 100%" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert (out / f"{run.name}-q4_k_m-UNVERIFIED.gguf").is_file() and (out / UNVERIFIED_MARKER).is_file()
    (entry,) = json.loads((run / MANIFEST).read_text())["exports"]
    assert entry["verified"] is False and entry["quant"] == "q4_k_m" and entry["figures"]["min_top1_agreement"] == 1


def test_without_llama_cpp_python_one_line(adapter, tmp_path, monkeypatch):
    monkeypatch.delenv("LORAKIT_LLAMA_CPP", raising=False)
    monkeypatch.setattr(gguf_mod, "llama_cpp_python_version", lambda: None)
    with pytest.raises(ExportError, match=r"needs llama.cpp: pip install 'lorakit\[gguf\]'"):
        export_gguf(adapter, tmp_path / "out", verify=False)


@pytest.mark.heavy  # a .ci/run step of its own (pyproject: markers)
def test_kill_9_during_gguf_conversion_leaves_no_output(adapter, tmp_path):
    import sys

    from process_helpers import kill_when

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lorakit.cli", "export", "--adapter", str(adapter), "--to", "gguf"]
    cmd += ["--quant", "f16", "--out", str(out)]
    # killed while llama.cpp's converter writes the GGUF
    kill_when(cmd, ".killed.exporting-*", tmp_path, lambda p: any(p.glob("*.gguf")), tmp_path)
    assert not out.exists()
    export_gguf(adapter, out, quant="f16", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed"]
