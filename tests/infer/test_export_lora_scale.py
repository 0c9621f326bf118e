"""peft's per-module LoRA scale carried into a GGUF LoRA (lorakit.infer.lora_scale).

llama.cpp applies each LoRA pair with lora_alpha / rank (one alpha per file, rank from the tensor);
peft with lora_alpha / r, lora_alpha / sqrt(r) under use_rslora, and per-module r / alpha from
rank_pattern / alpha_pattern. The unit tests check the folded weights against the scales peft itself
gives each module of the loaded adapter; the last test checks llama.cpp's logits against peft's."""

import json
from pathlib import Path

import pytest

from lorakit.infer.export import ExportError
from lorakit.infer.lora_scale import PEFT_PREFIX, fold_for_llama_cpp
from lorakit.runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS

try:  # the GGUF-convertible tiny model (smollm2's tokenizer) and the shared llama.cpp cache
    from test_export_gguf import _llama_cpp_cache, gguf_model  # noqa: F401

    NO_LLAMA_CPP = None
except pytest.skip.Exception as e:  # no llama-cpp-python / sentencepiece: only the llama.cpp test skips
    NO_LLAMA_CPP = str(e)


def make_adapter(model_dir, folder, *, r=4, alpha=8, std=0.5, targets=("q_proj", "v_proj"), seed=1, **config):
    """A peft LoRA adapter with random non-zero B (random_adapter.make_random_adapter, with any LoraConfig)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), task_type="CAUSAL_LM", **config)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    model.save_pretrained(folder)
    return folder


def peft_model(model_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    return PeftModel.from_pretrained(base, adapter).eval()


def peft_scales(model_dir, adapter) -> dict[str, float]:
    """The scale peft gives each LoRA module of the loaded adapter (the ground truth)."""
    from peft.tuners.lora import LoraLayer

    model = peft_model(model_dir, adapter)
    return {
        name.removeprefix(PEFT_PREFIX): m.scaling["default"]
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


def check_folded(model_dir, adapter, folded_dir) -> None:
    """What llama.cpp applies from the folded copy, (lora_alpha / rank) * B', is what peft applies, scale * B."""
    import torch
    from safetensors.torch import load_file

    raw, folded = load_file(adapter / ADAPTER_WEIGHTS), load_file(folded_dir / ADAPTER_WEIGHTS)
    assert raw.keys() == folded.keys()
    alpha = json.loads((adapter / ADAPTER_CONFIG).read_text())["lora_alpha"]
    scales = peft_scales(model_dir, adapter)
    assert scales
    for module, scale in scales.items():
        a, b = f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"
        rank = raw[b].shape[-1]
        torch.testing.assert_close(folded[b] * (alpha / rank), raw[b] * scale)
        assert torch.equal(folded[a], raw[a])


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"rank_pattern": {"q_proj": 8}},  # llama.cpp reads each tensor's rank: alpha / r is right as is
        {"r": 1, "use_rslora": True},  # alpha / sqrt(1) == alpha / 1
        {"alpha_pattern": {"v_proj": 8}},  # the same alpha as lora_alpha
    ],
    ids=["plain", "rank_pattern", "rslora_r1", "alpha_pattern_same"],
)
def test_nothing_to_fold(config, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", **config)
    alpha = json.loads((adapter / ADAPTER_CONFIG).read_text())["lora_alpha"]
    weights = load_file(adapter / ADAPTER_WEIGHTS)
    for module, scale in peft_scales(tiny_model_dir, adapter).items():  # already llama.cpp's alpha / rank
        assert scale == pytest.approx(alpha / weights[f"{PEFT_PREFIX}{module}.lora_B.weight"].shape[-1])
    src, info = fold_for_llama_cpp(adapter, tmp_path / "folded")
    assert src == adapter and info["folded"] is False and info["reason"]
    assert not (tmp_path / "folded").exists()


def test_rslora_is_folded(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", r=4, alpha=8, use_rslora=True)
    src, info = fold_for_llama_cpp(adapter, tmp_path / "folded")
    assert src == tmp_path / "folded"
    # peft: 8 / sqrt(4) = 4; llama.cpp: 8 / 4 = 2
    assert info == {**info, "folded": True, "alpha": 8.0, "modules": 4, "total_modules": 4, "scales": {"default": 2.0}}
    check_folded(tiny_model_dir, adapter, src)
    config = json.loads((src / ADAPTER_CONFIG).read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == 8


def test_alpha_pattern_is_folded(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", r=4, alpha=8, alpha_pattern={"v_proj": 32})
    src, info = fold_for_llama_cpp(adapter, tmp_path / "folded")
    assert info["folded"] and info["modules"] == 2 and info["total_modules"] == 4
    assert info["scales"] == {"default": 1.0, "alpha_pattern v_proj": 4.0}  # v_proj: 32 / 4 against 8 / 4
    check_folded(tiny_model_dir, adapter, src)
    assert "alpha_pattern" not in json.loads((src / ADAPTER_CONFIG).read_text())


def test_rslora_rank_and_alpha_patterns_are_folded(tiny_model_dir, tmp_path):
    adapter = make_adapter(
        tiny_model_dir,
        tmp_path / "adapter",
        r=4,
        alpha=8,
        targets=("q_proj", "v_proj", "down_proj"),
        use_rslora=True,
        rank_pattern={"model.layers.0.self_attn.q_proj": 8, "down_proj": 2},
        alpha_pattern={"v_proj": 16, "layers.1.mlp.down_proj": 4},
    )
    src, info = fold_for_llama_cpp(adapter, tmp_path / "folded")
    assert info["folded"] and info["modules"] == info["total_modules"] == 6
    # peft vs llama.cpp: default 8/2 vs 8/4, q0 8/sqrt(8) vs 8/8, v 16/2 vs 8/4, down 8/sqrt(2) vs 8/2,
    # down1 4/sqrt(2) vs 8/2
    assert info["scales"] == pytest.approx(
        {
            "default": 2.0,
            "rank_pattern model.layers.0.self_attn.q_proj": 8**0.5,
            "alpha_pattern v_proj": 4.0,
            "rank_pattern down_proj": 2**0.5,
            "rank_pattern down_proj, alpha_pattern layers.1.mlp.down_proj": 2**0.5 / 2,
        }
    )
    check_folded(tiny_model_dir, adapter, src)
    config = json.loads((src / ADAPTER_CONFIG).read_text())
    assert config["use_rslora"] is False and "alpha_pattern" not in config and "rank_pattern" not in config


def test_the_folded_copy_keeps_dtypes_metadata_and_model_card(tiny_model_dir, tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", use_rslora=True)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(adapter / ADAPTER_WEIGHTS).items()}
    save_file(weights, adapter / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (adapter / "README.md").write_text("---\nlicense: mit\n---\n# my adapter\n")
    src, info = fold_for_llama_cpp(adapter, tmp_path / "folded")
    folded = load_file(src / ADAPTER_WEIGHTS)
    assert {v.dtype for v in folded.values()} == {torch.bfloat16}
    for key, value in weights.items():
        want = (value.float() * 2.0).to(torch.bfloat16) if ".lora_B." in key else value
        assert torch.equal(folded[key], want), key
    with safe_open(str(src / ADAPTER_WEIGHTS), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert (src / "README.md").read_text() == (adapter / "README.md").read_text()
    raw, new = (json.loads((d / ADAPTER_CONFIG).read_text()) for d in (adapter, src))
    assert new == {**{k: v for k, v in raw.items() if k not in ("alpha_pattern", "rank_pattern")}, "use_rslora": False}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("lora_alpha"), r"adapter_config.json: no lora_alpha"),
        (lambda c: c.update(lora_alpha=0), r"adapter_config.json: lora_alpha is 0"),
        (lambda c: c.update(lora_alpha="8"), r"adapter_config.json: lora_alpha is '8', not a number"),
        (lambda c: c.update(rank_pattern={"q_proj": 16}), r"rank_pattern\['q_proj'\] is 16 for .*q_proj.* rank 4"),
    ],
    ids=["no_alpha", "alpha_zero", "alpha_string", "rank_pattern_wrong"],
)
def test_config_errors_name_the_file_and_key(change, message, tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", use_rslora=True)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    change(config)
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ExportError, match=message):
        fold_for_llama_cpp(adapter, tmp_path / "folded")
    assert not (tmp_path / "folded").exists()


def test_missing_weights_name_the_file(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", use_rslora=True)
    (adapter / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(ExportError, match=rf"{ADAPTER_WEIGHTS}: missing"):
        fold_for_llama_cpp(adapter, tmp_path / "folded")


# ---- the real check: llama.cpp's logits against peft's ---------------------------------------------

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Below is an instruction that describes a task. Write a response.",
]


def _torch_logits(model_dir, adapter, prompts):
    import torch

    model = peft_model(model_dir, adapter)
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in prompts]


def _llama_cpp_logits(base_gguf, lora_gguf, prompts):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(base_gguf), lora_path=str(lora_gguf), logits_all=True, n_ctx=256, verbose=False, seed=0
    )
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return out


def _compare(want, got) -> tuple[float, float]:
    """(top-1 agreement over all positions, max abs logit difference)."""
    import numpy as np

    same = sum(int((w.argmax(-1) == g.argmax(-1)).sum()) for w, g in zip(want, got))
    return same / sum(len(w) for w in want), max(float(np.abs(w - g).max()) for w, g in zip(want, got))


@pytest.mark.skipif(NO_LLAMA_CPP is not None, reason=f"{NO_LLAMA_CPP}")
@pytest.mark.heavy  # llama.cpp conversion and its logits, about 20 s: the heavy step of .ci/run
def test_llama_cpp_logits_match_peft_only_when_folded(gguf_model, tmp_path):
    from transformers import AutoTokenizer

    from lorakit.infer.gguf import export_gguf_lora, find_llama_cpp, run_script

    adapter = make_adapter(
        gguf_model,
        tmp_path / "adapter",
        r=4,
        alpha=8,
        std=0.5,
        targets=("q_proj", "v_proj", "o_proj"),
        use_rslora=True,
        rank_pattern={"model.layers.0.self_attn.q_proj": 8},
        alpha_pattern={"v_proj": 16},
    )
    out = tmp_path / "out"
    record = export_gguf_lora(adapter, out, verify=False)
    assert record["scale_folding"]["folded"] is True
    base_gguf, lora_gguf = (out / Path(record[k]).name for k in ("base_gguf_file", "lora_file"))
    unfolded = tmp_path / "unfolded-lora-f16.gguf"
    args = ["--base", str(gguf_model), "--outfile", str(unfolded), "--outtype", "f16", str(adapter)]
    run_script(find_llama_cpp(), "convert_lora_to_gguf.py", args)

    tok = AutoTokenizer.from_pretrained(gguf_model)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    want = _torch_logits(gguf_model, adapter, prompts)
    agree, diff = _compare(want, _llama_cpp_logits(base_gguf, lora_gguf, prompts))
    raw_agree, raw_diff = _compare(want, _llama_cpp_logits(base_gguf, unfolded, prompts))
    # measured: folded top-1 1.0, max |diff| 0.24 (f16 GGUFs); unfolded top-1 0.03, max |diff| 27
    assert agree >= 0.95 and diff < 0.5, f"folded: top-1 {agree:.3f}, max |diff| {diff:.3f}"
    assert raw_diff > 10 * diff and raw_agree < 0.5, f"unfolded: top-1 {raw_agree:.3f}, max |diff| {raw_diff:.3f}"
