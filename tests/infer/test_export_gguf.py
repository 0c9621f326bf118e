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

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'lorakit[gguf]'")
pytest.importorskip("sentencepiece", reason="llama.cpp's converter needs sentencepiece: pip install 'lorakit[gguf]'")

from gguf import GGUFReader

from lorakit.data.templates import resolve_template
from lorakit.infer import gguf as gguf_mod
from lorakit.infer.export import ExportError, export_chat_template
from lorakit.infer.gguf import export_gguf, export_gguf_lora
from lorakit.runfolder import EXPORT_RECORD

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
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-smol")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.5,  # wide logits: few near-ties for f16 rounding to flip
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(gguf_model, tmp_path_factory):
    return make_random_adapter(gguf_model, tmp_path_factory.mktemp("gguf-adapter"))


def _leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_f16_export_verifies_and_carries_the_training_template(adapter, gguf_model, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "f16"
    record = export_gguf(adapter, out, quant="f16", verify_new_tokens=NEW_TOKENS)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([f"{adapter.name}-f16.gguf", EXPORT_RECORD])
    assert record["gguf_file"] == str(out / f"{adapter.name}-f16.gguf")
    v = record["verification"]
    assert v["next_token_agreement"] >= 0.9 and v["next_token_agreement_tokens"] > 0, v
    assert v["answers_identical"] >= 0.5 * v["answers_checked"], v["differences"]
    assert v["template_identical"] == v["template_checked"]
    assert v["llama_cpp_tokens_per_s"] > 0
    tok = AutoTokenizer.from_pretrained(gguf_model)
    template = resolve_template(adapter=adapter, tokenizer=tok)
    reader = GGUFReader(record["gguf_file"])
    assert reader.get_field("tokenizer.chat_template").contents() == export_chat_template(template, tok)
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == tok.eos_token_id
    assert json.loads((out / EXPORT_RECORD).read_text())["verification"]["answers_identical"] == v["answers_identical"]
    assert _leftovers(out) == []


def test_q4_k_m_is_smaller_and_its_agreement_is_recorded(adapter, tmp_path, monkeypatch):
    # hidden size 64 is below a k-quant's 256-wide blocks (llama.cpp falls back to other types) and random
    # weights answer noise: agreement here is only measured, the real threshold is for real models
    monkeypatch.setattr(gguf_mod, "MIN_AGREEMENT_KQUANT", 0.0)
    f16 = export_gguf(adapter, tmp_path / "f16", quant="f16", verify=False)
    q4 = export_gguf(adapter, tmp_path / "q4", quant="q4_k_m", verify_new_tokens=NEW_TOKENS)
    assert q4["gguf_bytes"] < f16["gguf_bytes"]
    assert q4["quantizer"]
    v = q4["verification"]
    assert v["min_next_token_agreement"] == 0.0 and "k-quant" in v["threshold_note"]
    assert 0.0 <= v["next_token_agreement"] <= 1.0
    assert 0.0 <= v["mean_token_overlap"] <= 1.0 and v["answers_checked"] > 0
    assert GGUFReader(q4["gguf_file"]).get_field("general.file_type").contents() == 15  # MOSTLY_Q4_K_M


def test_gguf_lora_exports_and_verifies(adapter, tmp_path):
    out = tmp_path / "lora"
    record = export_gguf_lora(adapter, out, verify_new_tokens=NEW_TOKENS)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [EXPORT_RECORD, f"{adapter.name}-lora-f16.gguf", record["base_gguf_file"].rsplit("/", 1)[1]]
    )
    assert GGUFReader(record["lora_file"]).get_field("adapter.type").contents() == "lora"
    v = record["verification"]
    assert v["next_token_agreement"] >= 0.9 and v["answers_identical"] >= 0.5 * v["answers_checked"], v


def test_dora_is_refused(adapter, tmp_path):
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ExportError, match="DoRA.*--to gguf"):
        export_gguf_lora(dora, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_check_leaves_nothing(adapter, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ExportError("GGUF verification failed: simulated")

    monkeypatch.setattr(gguf_mod, "llama_cpp_answers", broken)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="nothing was written"):
        export_gguf(adapter, out, quant="q8_0")
    assert not out.exists() and _leftovers(out) == []


def test_without_llama_cpp_python_one_line(adapter, tmp_path, monkeypatch):
    monkeypatch.delenv("LORAKIT_LLAMA_CPP", raising=False)
    monkeypatch.setattr(gguf_mod, "llama_cpp_python_version", lambda: None)
    with pytest.raises(ExportError, match=r"needs llama.cpp: pip install 'lorakit\[gguf\]'"):
        export_gguf(adapter, tmp_path / "out", verify=False)
