"""INT8 adapters (`lorakit adapter quantize`) and the one adapter loader (infer/adapters.py),
on the tiny random Llama: size, error bound, logits, loading by name, unloading, refusals, CLI."""

import json
import shutil
import sys

import pytest
import torch
from random_adapter import make_random_adapter
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit.data.templates import load_template
from lorakit.errors import LorakitError, ModelError
from lorakit.infer.adapters import adapter_format, base_model_of, check_adapter_dir, load_adapter, unload_adapter
from lorakit.infer.generate import GenerationParams, Generator
from lorakit.infer.quantize import INT8_WEIGHTS, SCALE_SUFFIX, quantize_adapter, read_int8_adapter

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def float_adapter(tiny_model_dir, tmp_path_factory):
    """A rank-64 plain peft adapter (rank 64 so that tensor data, not the file header, dominates
    the file size, as in a real adapter), with a template record like a lorakit adapter."""
    folder = make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("float"), seed=3, r=64, alpha=16, std=0.2)
    load_template("alpaca_short").save(folder)
    (folder / "manifest.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    return folder


@pytest.fixture(scope="module")
def int8_adapter(float_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    figures = quantize_adapter(float_adapter, out)
    return out, figures


@pytest.fixture(scope="module")
def base_logits(tiny_model_dir):
    return logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())


def fresh(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_int8_folder_is_smaller_and_self_describing(float_adapter, int8_adapter):
    out, figures = int8_adapter
    float_bytes = (float_adapter / "adapter_model.safetensors").stat().st_size
    int8_bytes = (out / INT8_WEIGHTS).stat().st_size
    assert figures["size_before_bytes"] == float_bytes and figures["size_after_bytes"] == int8_bytes
    # fp32 -> int8 is 4x on the matrices; the per-row scales and the larger header cost a little
    assert 3.5 <= float_bytes / int8_bytes < 4.0, (float_bytes, int8_bytes)
    # plain peft must not take it for a float adapter; the side files came along
    assert not (out / "adapter_model.safetensors").exists()
    assert adapter_format(out) == "int8" and adapter_format(float_adapter) == "safetensors"
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (float_adapter / "adapter_config.json").read_text()
    )
    assert (out / "lorakit_template.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"] and manifest["quantization"]["format"] == "int8"
    with safe_open(str(out / INT8_WEIGHTS), "pt") as f:
        assert f.metadata()["lorakit_format"] == "int8"
        names = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.int8 for k in names if not k.endswith(SCALE_SUFFIX))
    assert figures["quantized_tensors"] == 8 and len(names) == 16
    assert not list(out.parent.glob(".*quantizing*"))  # no staging folder left behind


def test_dequantized_weights_within_int8_bound(float_adapter, int8_adapter):
    out, figures = int8_adapter
    ref = load_file(str(float_adapter / "adapter_model.safetensors"))
    got = read_int8_adapter(out)
    assert set(got) == set(ref)
    worst = 0.0
    for name, w in ref.items():
        err = (got[name] - w).abs()
        # symmetric per-row int8: error <= half a step, step = max|row| / 127 (scale rounded up
        # to float16 or bfloat16: at most 2^-7 larger)
        half_step = w.abs().amax(dim=1, keepdim=True) / 254 * (1 + 2**-7)
        assert (err <= half_step + 1e-12).all(), name
        assert err.max() > 0  # really quantized, not a float copy
        worst = max(worst, float(err.max()))
    assert figures["max_abs_weight_error"] == pytest.approx(worst)


def test_quantize_tensor_small_rows_and_zero_rows():
    """Rows too small for float16 scales (a briefly trained lora_B) use bfloat16 scales; a zero
    row stays zero; every scale is at least max|row|/127 (rounded up: no clipping)."""
    from lorakit.infer.quantize import dequantize_tensor, quantize_tensor

    torch.manual_seed(0)
    for magnitude, scale_dtype in ((1e-1, torch.float16), (1e-4, torch.bfloat16), (1e-30, torch.bfloat16)):
        w = torch.randn(48, 8) * magnitude
        w[5] = 0
        q, s = quantize_tensor(w)
        assert q.dtype == torch.int8 and s.dtype == scale_dtype and s.shape == (48,)
        assert int(q.abs().max()) == 127 and not q[5].any()
        row_max = w.abs().amax(dim=1)
        assert (s.float() >= row_max / 127).all()
        err = (dequantize_tensor(q, s) - w).abs()
        assert (err <= s.float().unsqueeze(1) / 2 * (1 + 1e-6)).all()
        assert (err.amax(dim=1) <= row_max / 254 * (1 + 2**-7) + 1e-45).all()


def test_int8_logits_close_to_float(tiny_model_dir, float_adapter, int8_adapter, base_logits):
    out, _ = int8_adapter
    f = logits(load_adapter(fresh(tiny_model_dir), float_adapter, "f"))
    q = logits(load_adapter(fresh(tiny_model_dir), out, "q"))
    effect = (f - base_logits).abs().max()
    drift = (q - f).abs().max()
    assert effect > 0.5, effect  # the adapter matters
    assert 0 < drift < 0.02 * effect, (drift, effect)


def test_generator_loads_int8_folder(tiny_model_dir, int8_adapter, base_logits):
    out, _ = int8_adapter
    gen = Generator(base=str(tiny_model_dir), adapter=str(out))
    assert gen.template.name == "alpaca_short"  # the template record was copied
    ref = logits(load_adapter(fresh(tiny_model_dir), out, "x"))
    assert torch.allclose(logits(gen.model), ref, atol=1e-6)
    assert not any(p.requires_grad for p in gen.model.parameters())  # frozen, for inference
    with gen.model.disable_adapter():
        assert torch.allclose(logits(gen.model), base_logits, atol=1e-5)
    params = GenerationParams(max_new_tokens=5)
    a = gen.generate("Who are you?", params=params)
    assert a == gen.generate("Who are you?", params=params) and isinstance(a, str)


def test_two_adapters_by_name_and_unload(tiny_model_dir, float_adapter, int8_adapter, base_logits):
    out, _ = int8_adapter
    other = make_random_adapter(tiny_model_dir, int8_adapter[0].parent / "other", seed=9, r=4)
    only_float = logits(load_adapter(fresh(tiny_model_dir), other, "a"))
    only_int8 = logits(load_adapter(fresh(tiny_model_dir), out, "b"))

    with pytest.raises(ModelError, match="reserved"):  # a torch.nn.Module attribute name
        load_adapter(fresh(tiny_model_dir), other, "float")
    model = load_adapter(fresh(tiny_model_dir), other, "fp")
    same = load_adapter(model, out, "int8")
    assert same is model and set(model.peft_config) == {"fp", "int8"}
    assert model.active_adapters == ["fp"]  # loading another adapter does not switch
    assert torch.allclose(logits(model), only_float, atol=1e-5)
    model.set_adapter("int8")
    assert torch.allclose(logits(model), only_int8, atol=1e-5)
    with pytest.raises(ModelError, match="already loaded"):
        load_adapter(model, out, "int8")

    unload_adapter(model, "int8")  # the active one: peft switches to the one left
    assert set(model.peft_config) == {"fp"}
    assert not any(".int8." in n for n, _ in model.named_parameters())  # its weights are gone
    assert torch.allclose(logits(model), only_float, atol=1e-5)
    unload_adapter(model, "fp")  # the last one
    assert not model.peft_config and not any("lora_" in n for n, _ in model.named_parameters())
    assert torch.allclose(logits(base_model_of(model)), base_logits, atol=1e-5)
    with pytest.raises(ModelError, match="not loaded"):
        unload_adapter(model, "fp")
    load_adapter(model, out, "again")  # an emptied model takes an adapter again, and it is active
    assert model.active_adapters == ["again"]
    assert torch.allclose(logits(model), only_int8, atol=1e-5)


def test_adapter_that_does_not_fit_is_one_line_and_leaves_model(tiny_model_dir, int8_adapter, tmp_path):
    out, _ = int8_adapter
    model = load_adapter(fresh(tiny_model_dir), out, "good")
    before = logits(model)
    for fmt_dir in (out, make_random_adapter(tiny_model_dir, tmp_path / "f", r=4)):
        wrong = tmp_path / f"wrong-{fmt_dir.name}"
        shutil.copytree(fmt_dir, wrong)
        cfg = json.loads((wrong / "adapter_config.json").read_text())
        cfg["target_modules"] = ["q_proj"]  # the file also holds v_proj weights: no place for them
        (wrong / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelError, match="does not fit base model") as e:
            load_adapter(model, wrong, "bad")
        assert "\n" not in str(e.value) and "v_proj" in str(e.value)
        assert set(model.peft_config) == {"good"} and model.active_adapters == ["good"]
        assert torch.equal(logits(model), before)
    plain = fresh(tiny_model_dir)
    with pytest.raises(ModelError, match="does not fit base model"):  # plain model: same check
        load_adapter(plain, tmp_path / "wrong-int8", "bad")
    assert not any("lora_" in n for n, _ in plain.named_parameters())  # its LoRA layers removed again
    assert torch.equal(logits(plain), logits(fresh(tiny_model_dir)))


def test_pickle_only_and_corrupted_int8_refused(tiny_model_dir, int8_adapter, tmp_path):
    out, _ = int8_adapter
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(out / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"a pickle that must never be unpickled")
    for call in (
        lambda: check_adapter_dir(pickled),
        lambda: load_adapter(fresh(tiny_model_dir), pickled, "p"),
        lambda: Generator(base=str(tiny_model_dir), adapter=str(pickled)),
    ):
        with pytest.raises(ModelError, match="safetensors only") as e:
            call()
        assert "\n" not in str(e.value)

    flipped = tmp_path / "flipped"
    shutil.copytree(out, flipped)
    raw = bytearray((flipped / INT8_WEIGHTS).read_bytes())
    raw[-100] ^= 0x5A  # one byte of tensor data
    (flipped / INT8_WEIGHTS).write_bytes(bytes(raw))
    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    (truncated / INT8_WEIGHTS).write_bytes(raw[: len(raw) // 2])
    for bad, reason in ((flipped, "checksum"), (truncated, "unreadable")):
        model = fresh(tiny_model_dir)
        with pytest.raises(ModelError, match=reason) as e:
            load_adapter(model, bad, "x")
        assert "\n" not in str(e.value) and "not a valid lorakit int8 adapter" in str(e.value)
        assert not hasattr(model, "peft_config")  # refused before the model was touched
    with pytest.raises(LorakitError, match="already an int8 adapter"):
        quantize_adapter(out, tmp_path / "again")


def test_eval_accepts_int8_beside_float(tiny_model_dir, float_adapter, int8_adapter, tmp_path):
    from lorakit.eval.runner import evaluate

    out, _ = int8_adapter
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"instruction": f"What is {i} plus {i}?", "output": str(2 * i)} for i in range(3)]))
    result = evaluate(
        str(tiny_model_dir),
        [str(out), str(float_adapter)],
        [str(data)],
        tmp_path / "r",
        metrics=["exact_match"],
        max_new_tokens=3,
        batch_size=3,
    )
    models = {m["name"]: m for m in result["models"]}
    q, f = models[out.name], models[float_adapter.name]
    assert q["trainable_params"] == f["trainable_params"] == 2 * (64 * 64 * 2 + 64 * 64 + 32 * 64)
    assert q["adapter_size_bytes"] * 3.5 < f["adapter_size_bytes"]
    loss_q, loss_f = result["scores"][out.name]["qa"]["loss"], result["scores"][float_adapter.name]["qa"]["loss"]
    loss_base = result["scores"]["base"]["qa"]["loss"]
    assert abs(loss_q - loss_f) < 0.05 * abs(loss_f - loss_base), (loss_q, loss_f, loss_base)


def test_cli_quantize_and_error(float_adapter, tmp_path, monkeypatch, capsys):
    """`lorakit adapter quantize` through the console entry point (cli.main), in-process."""
    from lorakit import cli

    def run(*args) -> int:
        monkeypatch.setattr(sys, "argv", ["lorakit", "adapter", "quantize", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            cli.main()
        return e.value.code

    assert run(float_adapter, "--out", tmp_path / "q") == 0
    r = capsys.readouterr()
    assert "x smaller" in r.out and (tmp_path / "q" / INT8_WEIGHTS).is_file()
    assert run(float_adapter, "--out", tmp_path / "q") == 2  # exists: one error line, exit 2
    r = capsys.readouterr()
    assert r.err.splitlines() == [r.err.strip()] and r.err.startswith("error: --out:") and "--force" in r.err
    assert "Traceback" not in r.err + r.out
    assert run(tmp_path / "nowhere", "--out", tmp_path / "q2") == 2
    assert capsys.readouterr().err.startswith("error: adapter:")
