"""From a base_model setting to a loaded tokenizer and model, offline."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from lorakit.errors import ConfigError, ModelError
from lorakit.models import loading
from lorakit.models.loading import (
    check_quantization,
    load_model,
    load_tokenizer,
    model_module_names,
    quantization_config,
    resolve_model_path,
    resolve_precision,
)


@pytest.fixture
def fake_pull(monkeypatch) -> list[str]:
    """Record what resolve_model_path pulls instead of pulling it."""
    pulled: list[str] = []

    def pull(name_or_path):
        pulled.append(name_or_path)
        return Path("/cache/models") / Path(name_or_path).stem

    monkeypatch.setattr(loading, "pull", pull)
    return pulled


@pytest.fixture
def hub_offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set the constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# resolve_model_path ------------------------------------------------------------------------------


def test_folder_with_config(tiny_model_dir, fake_pull):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert fake_pull == []


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="is a folder but holds no config.json"):
        resolve_model_path(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file but not a .gguf model"):
        resolve_model_path(str(weights))


def test_gguf_file_is_pulled(tmp_path, fake_pull):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_path(str(gguf)) == "/cache/models/m"
    assert fake_pull == [str(gguf)]


def test_missing_gguf_file(tmp_path, fake_pull):
    with pytest.raises(ModelError, match="no such .gguf file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    assert fake_pull == []


def test_alias_is_pulled(fake_pull):
    assert resolve_model_path("smollm2-135m") == "/cache/models/smollm2-135m"
    assert fake_pull == ["smollm2-135m"]


def test_hub_id_is_returned_unchanged(fake_pull):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert fake_pull == []


@pytest.mark.parametrize("name", ["./missing_dir", "nosuchmodel", "a/b/c", "../up/model"])
def test_unknown_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as info:
        resolve_model_path(name)
    message = str(info.value)
    assert repr(name) in message and "smollm2-135m" in message and "org/name" in message


# resolve_precision -------------------------------------------------------------------------------


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine: machine(cuda=..., cuda_bf16=..., cpu_flags=...)."""

    def pretend(cuda=False, cuda_bf16=False, cpu_flags=()):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(loading, "_cpu_flags", lambda: set(cpu_flags))

    return pretend


@pytest.mark.parametrize(
    "cuda, cuda_bf16, cpu_flags, expected",
    [
        (True, True, (), "bf16"),
        (True, False, (), "fp16"),
        (False, False, ("avx2", "avx512_bf16"), "bf16"),
        (False, False, ("amx_bf16",), "bf16"),
        (False, False, ("avx2", "avx512f"), "fp32"),
        (False, False, (), "fp32"),  # no /proc/cpuinfo (macOS, Windows)
    ],
)
def test_auto_precision(machine, cuda, cuda_bf16, cpu_flags, expected):
    machine(cuda=cuda, cuda_bf16=cuda_bf16, cpu_flags=cpu_flags)
    assert resolve_precision("auto") == expected


def test_explicit_precision_on_cpu(machine):
    machine(cuda=False, cpu_flags=())
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"  # allowed (emulated) even without native bf16
    with pytest.raises(ConfigError, match="precision: fp16 needs a CUDA GPU"):
        resolve_precision("fp16")


def test_fp16_on_gpu(machine):
    machine(cuda=True, cuda_bf16=True)
    assert resolve_precision("fp16") == "fp16"


def test_unknown_precision():
    with pytest.raises(ConfigError, match="precision: unknown value 'fp8'"):
        resolve_precision("fp8")


def test_cpu_flags_reader_returns_a_set():
    assert isinstance(loading._cpu_flags(), set)


# quantization ------------------------------------------------------------------------------------


def test_no_quantization_is_fine_anywhere(machine):
    machine(cuda=False)
    check_quantization(False, False)
    assert quantization_config(False, False, torch.float32) is None


@pytest.mark.parametrize("key", ["load_in_4bit", "load_in_8bit"])
def test_quantization_without_cuda(machine, key):
    machine(cuda=False)
    with pytest.raises(ConfigError) as info:
        check_quantization(load_in_8bit=key == "load_in_8bit", load_in_4bit=key == "load_in_4bit")
    message = str(info.value)
    assert message.startswith(key) and "no CUDA device" in message and "\n" not in message


def test_both_quantizations(machine):
    machine(cuda=True)
    with pytest.raises(ConfigError, match="load_in_8bit and load_in_4bit"):
        check_quantization(True, True)


def test_quantization_without_bitsandbytes(machine, monkeypatch):
    machine(cuda=True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match="load_in_4bit needs bitsandbytes.*pip install bitsandbytes"):
        check_quantization(False, True)


def test_quantization_configs():
    qlora = quantization_config(False, True, torch.bfloat16)
    assert qlora.load_in_4bit and qlora.bnb_4bit_quant_type == "nf4" and qlora.bnb_4bit_use_double_quant
    assert qlora.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(True, False, torch.float16).load_in_8bit


def test_load_model_passes_quantization_and_safe_defaults(monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda name, **kwargs: seen.update(kwargs, name=name) or "model"
    )
    assert load_model("org/model", dtype=torch.bfloat16, load_in_4bit=True, device_map={"": 0}) == "model"
    assert seen["name"] == "org/model" and seen["dtype"] == torch.bfloat16
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    assert seen["quantization_config"].bnb_4bit_quant_type == "nf4" and seen["device_map"] == {"": 0}


# loading -----------------------------------------------------------------------------------------


def test_load_tokenizer_pads_right(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"


def test_load_tokenizer_without_pad_uses_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>" and loaded.padding_side == "right"


def test_load_model_in_dtype(tiny_model_dir):
    model = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_load_model_refuses_pickle_weights(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle that must never be unpickled")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert "pytorch_model.bin" in message and "only safetensors" in message and "save_pretrained" in message


@pytest.mark.parametrize("load", [load_tokenizer, load_model])
def test_hub_id_offline(hub_offline, load):
    with pytest.raises(ModelError) as info:
        load("lorakit-test/no-such-model")
    message = str(info.value)
    assert message.startswith("could not load ") and "'lorakit-test/no-such-model'" in message
    assert "Offline?" in message and "smollm2-135m" in message and "\n" not in message


def test_module_names_llama(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    assert model_module_names(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_module_names_gpt2_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0)
    )
    assert model_module_names(model) == ["c_attn", "c_fc", "c_proj"]
