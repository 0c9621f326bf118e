"""An adapter trained with QLoRA (load_in_4bit) is exported merged into the base that scores better
on the verification examples' own answers: the original base, or the de-quantized 4-bit base it
trained on (bitsandbytes' own quantize/dequantize, on CPU). The choice and both scores are recorded,
the exported weights are that base + the adapter, and the verification runs against lorakit on the
same base."""

import json
import shutil

import pytest
import torch
import yaml
from random_adapter import make_random_adapter

pytest.importorskip("bitsandbytes", reason="QLoRA export needs bitsandbytes: pip install bitsandbytes")

from lorakit.infer.export import choose_qlora_base, export
from lorakit.infer.verify import verification_set
from lorakit.runfolder import CONFIG_RECORD, MANIFEST

RECORDS = [
    {"instruction": f"Question {i}: what is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."} for i in range(6)
]


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("qlora") / "run"
    make_random_adapter(tiny_model_dir, run, std=0.05)
    data = run.parent / "data.json"
    data.write_text(json.dumps(RECORDS))
    config = {"base_model": str(tiny_model_dir), "data_path": str(data), "load_in_4bit": True, "output_dir": str(run)}
    (run / CONFIG_RECORD).write_text(yaml.safe_dump(config))
    (run / MANIFEST).write_text(json.dumps({"base_model": str(tiny_model_dir), "template": "alpaca"}))
    return run


def _q_proj(folder):
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    return weights["model.layers.0.self_attn.q_proj.weight"]


def test_choice_is_scored_and_the_lower_nll_kept(qlora_run):
    vset = verification_set(qlora_run, None, 4)
    assert all(c.output for c in vset.prompts)
    choice = choose_qlora_base(qlora_run, None, vset, merged=True)
    assert choice["trained_in_4bit"]["quant_type"] == "nf4" and choice["tokens"] > 0
    nll = choice["mean_nll"]
    assert set(nll) == {"original", "dequantized"} and nll["original"] != nll["dequantized"]
    assert choice["kept"] == min(nll, key=nll.get)
    # a GGUF LoRA runs on the original base in llama.cpp: recorded, not chosen
    assert choose_qlora_base(qlora_run, None, vset, merged=False)["kept"] == "original"
    # without answers to score: the de-quantized base, said so
    assert "not scored" in choose_qlora_base(qlora_run, None, None, merged=True)["note"]


def test_export_hf_merges_into_the_kept_base_and_verifies(qlora_run, tiny_model_dir, tmp_path, monkeypatch):
    from lorakit.infer import export as export_mod
    from lorakit.infer.merge import load_merged
    from lorakit.infer.qlora_base import trained_in_4bit

    settings = trained_in_4bit(qlora_run)
    merged_into = {
        kind: _state(load_merged(qlora_run, None, "fp32", False, settings if kind == "dequantized" else None))
        for kind in ("original", "dequantized")
    }
    assert not torch.equal(merged_into["original"], merged_into["dequantized"])
    real = export_mod.choose_qlora_base
    for kept in ("original", "dequantized"):  # both outcomes of the choice, forced in turn

        def forced(*args, kept=kept, **kwargs):
            return {**real(*args, **kwargs), "kept": kept}

        monkeypatch.setattr(export_mod, "choose_qlora_base", forced)
        out = tmp_path / kept
        record = export(qlora_run, out, verify_prompts=3, verify_new_tokens=4)
        assert record["qlora_base"]["kept"] == kept and record["verified"]
        assert torch.allclose(_q_proj(out), merged_into[kept], atol=1e-6)
        assert ("de-quantized 4-bit base" in record["verification"]["reference"]) == (kept == "dequantized")
        saved = json.loads((out / "export.json").read_text())
        assert saved["qlora_base"]["mean_nll"] == record["qlora_base"]["mean_nll"]


def _state(merged):
    return merged.model.state_dict()["model.layers.0.self_attn.q_proj.weight"].clone()


def test_a_plain_adapter_has_no_qlora_choice(qlora_run, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(qlora_run, plain)
    config = yaml.safe_load((plain / CONFIG_RECORD).read_text())
    (plain / CONFIG_RECORD).write_text(yaml.safe_dump({**config, "load_in_4bit": False}))
    assert choose_qlora_base(plain, None, verification_set(plain, None, 2), merged=True) is None
