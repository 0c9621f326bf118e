"""check_portability through the real `lorakit export` command: each adapter an export target
cannot carry is refused before any work with one `error:` line (exit 2) and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from random_adapter import make_random_adapter
from test_cli import assert_user_error, lorakit

from lorakit.runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INT8_WEIGHTS


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    import os

    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "COLUMNS": "200",
        "LORAKIT_HOME": str(tmp_path_factory.mktemp("lorakit-home")),
    }


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("portability") / "lora")


def _variant(adapter, tmp_path, **config):
    folder = tmp_path / "variant"
    shutil.copytree(adapter, folder)
    path = folder / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def _export(folder, tmp_path, env, *args):
    out = tmp_path / "out"
    r = lorakit("export", "--adapter", folder, "--out", out, *args, cwd=tmp_path, env=env)
    assert not out.exists()
    return r


@pytest.mark.parametrize("target", [("--to", "gguf-lora"), ("--to", "ollama", "--lora-only")])
def test_dora_refused_for_a_gguf_lora(adapter, tmp_path, env, target):
    folder = _variant(adapter, tmp_path, use_dora=True)
    assert_user_error(_export(folder, tmp_path, env, *target), "DoRA", "merge it instead")


def test_int8_refused_for_a_gguf_lora(adapter, tmp_path, env):
    folder = _variant(adapter, tmp_path)
    (folder / ADAPTER_WEIGHTS).rename(folder / INT8_WEIGHTS)  # only the file's presence is read
    assert_user_error(_export(folder, tmp_path, env, "--to", "gguf-lora"), "int8 adapter", "float adapter")


@pytest.mark.parametrize(
    "config, needle",
    [({"modules_to_save": ["lm_head"]}, "lm_head"), ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens")],
)
def test_modules_llama_cpp_cannot_adapt_refused(adapter, tmp_path, env, config, needle):
    folder = _variant(adapter, tmp_path, **config)
    line = assert_user_error(_export(folder, tmp_path, env, "--to", "ollama", "--lora-only"), needle)
    assert "merge it instead" in line


def test_merged_targets_accept_what_a_lora_export_refuses(adapter, tmp_path):
    from lorakit.infer.export import check_portability

    folder = _variant(adapter, tmp_path, use_dora=True, modules_to_save=["lm_head"])
    for target in ("hf", "gguf", "ollama"):
        check_portability(folder, target, None)


def test_other_base_refused_naming_both(adapter, tiny_model_dir, tmp_path, env):
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    r = _export(adapter, tmp_path, env, "--to", "hf", "--base", other)
    assert_user_error(r, f"--base: {other}", str(tiny_model_dir))


def test_unknown_target_and_lora_only_misuse(adapter, tmp_path, env):
    assert_user_error(_export(adapter, tmp_path, env, "--to", "onnx"), "--to: 'onnx'")
    assert_user_error(_export(adapter, tmp_path, env, "--to", "hf", "--lora-only"), "--lora-only")
