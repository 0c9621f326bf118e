"""Generation and merge on a tiny random Llama with a (plain peft) adapter."""

import json

import pytest
import torch
from peft import PeftModel
from random_adapter import make_random_adapter
from transformers import AutoModelForCausalLM

from lorakit.data.templates import load_template
from lorakit.errors import LorakitError, ModelError
from lorakit.infer.generate import GenerationParams, Generator
from lorakit.infer.merge import merge_adapter


@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dir, tmp_path_factory):
    """An adapter saved by plain peft, with non-zero B so it changes the model."""
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("peft-adapter"))


def test_plain_peft_adapter_generates_with_alpaca_default(tiny_model_dir, peft_adapter):
    gen = Generator(base=str(tiny_model_dir), adapter=str(peft_adapter))
    assert gen.template.name == "alpaca"
    params = GenerationParams(max_new_tokens=6)
    a = gen.generate("What is 2 plus 2?", params=params)
    assert a == gen.generate("What is 2 plus 2?", params=params)  # greedy is deterministic
    assert isinstance(gen.generate("What is 2 plus 2?", params=params, use_adapter=False), str)


def test_batched_greedy_equals_one_by_one(tiny_model_dir, peft_adapter):
    gen = Generator(base=str(tiny_model_dir), adapter=str(peft_adapter))
    qs = ["Who are you?", "What is the capital of France? Tell me now.", "Hi"]
    params = GenerationParams(max_new_tokens=8)
    assert gen.generate_batch(qs, params=params) == [gen.generate(q, params=params) for q in qs]


def test_adapter_changes_logits_and_compare_uses_base(tiny_model_dir, peft_adapter):
    gen = Generator(base=str(tiny_model_dir), adapter=str(peft_adapter))
    ids = torch.tensor([gen.prompt_ids("Hi")])
    with torch.no_grad():
        tuned = gen.model(input_ids=ids).logits
        with gen.model.disable_adapter():
            base = gen.model(input_ids=ids).logits
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, base, atol=1e-5)
    assert (tuned - base).abs().max() > 1e-3


def test_merge_matches_base_plus_adapter(tiny_model_dir, peft_adapter, tmp_path):
    out = merge_adapter(peft_adapter, tmp_path / "merged", base=str(tiny_model_dir))
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads it
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(peft_adapter))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    record = json.loads((out / "lorakit_merge.json").read_text())
    assert record["dtype"] == "fp32" and record["template"] == "alpaca"
    # a plain peft adapter records no template: the merged model keeps the one it was prompted
    # with (alpaca), not the base tokenizer's chat template
    assert Generator(base=str(out)).template.name == "alpaca"
    with pytest.raises(LorakitError, match="not empty"):
        merge_adapter(peft_adapter, out, base=str(tiny_model_dir))
    assert not list(tmp_path.glob(".merged*"))


def test_merged_folder_keeps_template(tiny_model_dir, peft_adapter, tmp_path):
    load_template("alpaca_short").save(peft_adapter)
    try:
        out = merge_adapter(peft_adapter, tmp_path / "m", base=str(tiny_model_dir), dtype="bf16")
        assert Generator(base=str(out)).template.name == "alpaca_short"
        assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    finally:
        (peft_adapter / "lorakit_template.json").unlink()


def test_bad_adapter_folders(tmp_path):
    with pytest.raises(ModelError, match="not a folder"):
        Generator(adapter=str(tmp_path / "missing"))
    (tmp_path / "a").mkdir()
    with pytest.raises(ModelError, match="adapter_config.json"):
        Generator(adapter=str(tmp_path / "a"))
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="safetensors only"):
        Generator(adapter=str(tmp_path / "a"))
