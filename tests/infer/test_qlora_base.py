"""qlora_base: which 4-bit settings a run trained with (from its config record), and the base those
settings give: the tiny Llama's quantized weights round-tripped through bitsandbytes exactly as a
direct quantize_4bit / dequantize_4bit does, and nothing else touched."""

import json
import sys

import pytest
import torch

from lorakit.config import TrainConfig, dump_config
from lorakit.infer.export import ExportError
from lorakit.infer.qlora_base import dequantize_like_training, quantized_module_names, trained_in_4bit
from lorakit.runfolder import CONFIG_RECORD, MANIFEST, checkpoint_dir

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_DOUBLE = {
    "quant_type": "nf4",
    "double_quant": True,
    "blocksize": 64,
    "quant_storage": "uint8",
    "skip_modules": None,
    "compute_dtype": "bfloat16",
}


def write_run(folder, manifest=None, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_RECORD).write_text(dump_config(TrainConfig(**config)), encoding="utf-8")
    if manifest is not None:
        (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return folder


# ---- trained_in_4bit ---------------------------------------------------------------------------


def test_trained_in_4bit_reads_the_run_record(tmp_path):
    run = write_run(tmp_path / "run", manifest={"precision": "bf16"}, load_in_4bit=True)
    settings = trained_in_4bit(run)
    assert settings == NF4_DOUBLE
    assert json.loads(json.dumps(settings)) == settings  # fit for an export record


def test_trained_in_4bit_from_a_checkpoint_uses_its_run(tmp_path):
    run = write_run(tmp_path / "run", load_in_4bit=True, precision="fp32")
    checkpoint = checkpoint_dir(run, 20)
    checkpoint.mkdir()
    assert trained_in_4bit(checkpoint) == {**NF4_DOUBLE, "compute_dtype": "float32"}


def test_trained_in_4bit_precision_auto_without_manifest_leaves_compute_dtype_unknown(tmp_path):
    run = write_run(tmp_path / "run", load_in_4bit=True)  # precision: auto, no manifest yet
    assert trained_in_4bit(run) == {**NF4_DOUBLE, "compute_dtype": None}


def test_trained_in_4bit_none_when_not_4bit(tmp_path):
    assert trained_in_4bit(write_run(tmp_path / "full", load_in_4bit=False)) is None
    assert trained_in_4bit(write_run(tmp_path / "eight", load_in_8bit=True)) is None


def test_trained_in_4bit_none_when_nothing_recorded(tmp_path):
    assert trained_in_4bit(tmp_path) is None
    (tmp_path / CONFIG_RECORD).write_text("load_in_4bit: [unclosed\n", encoding="utf-8")
    assert trained_in_4bit(tmp_path) is None
    assert trained_in_4bit(tmp_path / "missing" / "checkpoint-5") is None


def test_trained_in_4bit_key_missing_is_none(tmp_path):
    (tmp_path / CONFIG_RECORD).write_text("base_model: smollm2-135m\n", encoding="utf-8")
    assert trained_in_4bit(tmp_path) is None


# ---- dequantize_like_training ------------------------------------------------------------------


def _bnb_device() -> str:
    """Where bitsandbytes' 4-bit round trip runs here: cpu when it can, else cuda, else skip."""
    functional = pytest.importorskip("bitsandbytes.functional")
    try:
        q, state = functional.quantize_4bit(
            torch.randn(4, 64), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        functional.dequantize_4bit(q, state)
        return "cpu"
    except Exception as e:
        if torch.cuda.is_available():
            return "cuda"
        pytest.skip(f"bitsandbytes cannot run 4-bit quantization on CPU and there is no CUDA GPU: {e}")


def direct_round_trip(weight, quant_type, double_quant):
    from bitsandbytes import functional

    q, state = functional.quantize_4bit(
        weight.contiguous(), blocksize=64, compress_statistics=double_quant, quant_type=quant_type
    )
    return functional.dequantize_4bit(q, state)


def load_tiny(model_dir, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_like_training_round_trips_every_projection(tiny_model_dir, quant_type, double_quant):
    device = _bnb_device()
    model = load_tiny(tiny_model_dir, device)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    settings = {**NF4_DOUBLE, "quant_type": quant_type, "double_quant": double_quant}

    replaced = dequantize_like_training(model, settings)

    layers = model.config.num_hidden_layers
    assert replaced == layers * len(PROJECTIONS) == 14
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {
        f"model.layers.{i}.{kind}.{p}.weight"
        for i in range(layers)
        for kind, projections in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:]))
        for p in projections
    }
    for name in changed:
        old, new = before[name], after[name]
        assert new.dtype == old.dtype and new.shape == old.shape
        relative = ((new - old).norm() / old.norm()).item()
        assert 0.01 < relative < 0.2, (name, relative)  # 4-bit: ~9% for nf4, ~12% for fp4
        assert torch.equal(new, direct_round_trip(old, quant_type, double_quant)), name
    # the tied lm_head / embeddings and the norms are untouched (asserted through `changed`)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_bf16_weights_round_trip_from_their_fp32_value(tiny_model_dir):
    device = _bnb_device()
    model = load_tiny(tiny_model_dir, device).to(torch.bfloat16)
    weight = model.model.layers[0].self_attn.q_proj.weight
    original = weight.detach().clone()
    assert dequantize_like_training(model, NF4_DOUBLE) == 14
    assert weight.dtype == torch.bfloat16
    # training quantized the fp32 load of the same values
    assert torch.equal(weight, direct_round_trip(original.float(), "nf4", True).to(torch.bfloat16))


def test_untied_lm_head_is_kept_and_skip_modules_follow_transformers(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    device = _bnb_device()
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device)
    head = model.lm_head.weight.detach().clone()
    assert "lm_head" not in quantized_module_names(model, NF4_DOUBLE)
    assert dequantize_like_training(model, NF4_DOUBLE) == 14
    assert torch.equal(model.lm_head.weight, head)
    # an explicit skip list replaces transformers' default skips, as in its own quantizer
    names = quantized_module_names(model, {**NF4_DOUBLE, "skip_modules": ["down_proj"]})
    assert not any(n.endswith("down_proj") for n in names)
    assert len(names) == 12 + 1 and "lm_head" in names


def test_selection_matches_transformers_replace_with_bnb_linear(tiny_model_dir):
    """The modules chosen are those transformers' own bnb loading turns into Linear4bit."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    from lorakit.models.loading import quantization_config

    for tied in (True, False):
        config = AutoConfig.from_pretrained(tiny_model_dir)
        config.tie_word_embeddings = tied
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        ours = quantized_module_names(model, NF4_DOUBLE)
        bnb_config = quantization_config(False, True, torch.bfloat16)
        keep = HfQuantizer.get_modules_to_not_convert(
            model, bnb_config.llm_int8_skip_modules, model._keep_in_fp32_modules
        )
        replace_with_bnb_linear(model, modules_to_not_convert=keep, quantization_config=bnb_config)
        theirs = [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert ours == theirs and len(ours) == 14, tied


def test_missing_bitsandbytes_is_an_export_error(tiny_model_dir, monkeypatch):
    model = load_tiny(tiny_model_dir, "cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ExportError, match=r"needs bitsandbytes: pip install bitsandbytes") as info:
        dequantize_like_training(model, NF4_DOUBLE)
    assert "\n" not in str(info.value)


def test_bitsandbytes_that_cannot_run_here_is_an_export_error(tiny_model_dir, monkeypatch):
    functional = pytest.importorskip("bitsandbytes.functional")
    model = load_tiny(tiny_model_dir, "cpu")
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for cpu\nlong trace")

    monkeypatch.setattr(functional, "quantize_4bit", no_kernel)
    with pytest.raises(ExportError, match=r"cannot run 4-bit nf4 quantization on cpu .*CUDA GPU") as info:
        dequantize_like_training(model, NF4_DOUBLE)
    assert "\n" not in str(info.value)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)  # nothing half-done


def test_an_adapter_wrapped_model_is_refused(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_tiny(tiny_model_dir, "cpu"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="before an adapter"):
        quantized_module_names(model, NF4_DOUBLE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the CPU round trip with CUDA's")
def test_cpu_round_trip_agrees_with_cuda():
    """Export may rebuild on CPU the base a GPU trained on: bitsandbytes' CPU and CUDA kernels
    should give (almost) the same weights."""
    if _bnb_device() != "cpu":
        pytest.skip("bitsandbytes cannot run 4-bit quantization on CPU here")
    torch.manual_seed(0)
    weight = torch.randn(576, 1536) * 0.05
    for quant_type in ("nf4", "fp4"):
        for double_quant in (True, False):
            cpu = direct_round_trip(weight, quant_type, double_quant)
            cuda = direct_round_trip(weight.cuda(), quant_type, double_quant).cpu()
            differ = (cpu != cuda).float().mean().item()
            assert differ < 1e-3, (quant_type, double_quant, differ, (cpu - cuda).abs().max().item())
