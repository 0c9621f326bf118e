"""lorakit export --to hf on the tiny random Llama: the exported tokenizer's chat template gives
lorakit's prompt ids, generation_config stops where lorakit stops, greedy answers match, and a
failed verification leaves nothing behind."""

import json
import os
import subprocess
import sys

import pytest
from random_adapter import make_random_adapter
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lorakit.data.records import Turn
from lorakit.data.templates import load_template
from lorakit.infer import export as export_mod
from lorakit.infer.export import (
    CHECK_CONVERSATIONS,
    Conversation,
    ExportError,
    check_prompt_ids,
    export_adapter,
    export_chat_template,
    messages_for,
    write_generation_config,
)
from lorakit.infer.generate import Generator, prompt_ids_for

USER_TEMPLATE = {
    "description": 'A user\'s template with "quotes", {braces}, {{ jinja }}, {% tags %}, #} and \\ backslashes.',
    "prompt_input": "<<SYS \"q\" 'x' {{x}} {% raw %}>>\n### User:\n{instruction}\n\n"
    "### Context: '{input}' {% endraw %}\n}}### Bot:\\n\n",
    "prompt_no_input": '<<SYS "q" {#c#}>>\n### User:\n{instruction}\n\t}}### Bot:\\n\n',
    "response_split": "### Bot:",
}


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("export-adapter"))


@pytest.fixture(scope="module")
def user_template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "my_tpl.json"
    path.write_text(json.dumps(USER_TEMPLATE), encoding="utf-8")
    return path


def _template(name, tiny_tokenizer, user_template_file):
    return load_template(str(user_template_file) if name == "user" else name, tiny_tokenizer)


@pytest.mark.parametrize("name", ["alpaca", "alpaca_short", "alpaca_legacy", "chat", "user"])
def test_exported_chat_template_gives_lorakit_prompt_ids(name, tiny_tokenizer, user_template_file, tmp_path):
    template = _template(name, tiny_tokenizer, user_template_file)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = export_chat_template(template, tok)
    tok.save_pretrained(tmp_path)
    conversations = CHECK_CONVERSATIONS + [
        Conversation("Q with \"{instruction}\" and '{input}'", input="x\ny {% raw %}"),
        Conversation("Next?", input="dropped", history=(Turn("user", "A {input}"), Turn("assistant", "B\n"))),
    ]
    identical, problems = check_prompt_ids(tmp_path, template, tiny_tokenizer, conversations)
    assert problems == [] and identical == len(conversations)
    # the texts match too (not only the ids), also without add_generation_prompt for alpaca
    fresh = AutoTokenizer.from_pretrained(tmp_path)
    conv = CHECK_CONVERSATIONS[3]
    text = fresh.apply_chat_template(messages_for(template, conv), add_generation_prompt=True, tokenize=False)
    assert text == template.build_prompt(
        conv.instruction, history=list(conv.history), system=conv.system, tokenizer=tiny_tokenizer
    )


def test_chat_kind_exports_the_recorded_jinja(tiny_tokenizer):
    template = load_template("chat", tiny_tokenizer)
    assert export_chat_template(template, tiny_tokenizer) == template.chat_template


def test_generation_config_stops(tiny_model_dir, tiny_tokenizer, tmp_path):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = type("M", (), {"config": config})()
    alpaca = write_generation_config(tmp_path / "a", model, load_template("alpaca"), tiny_tokenizer)
    saved = GenerationConfig.from_pretrained(tmp_path / "a")
    assert alpaca["eos_token_id"] == [tiny_tokenizer.eos_token_id]
    assert saved.stop_strings == ["### Instruction:", "### Input:", "### Response:"]
    chat = write_generation_config(tmp_path / "c", model, load_template("chat", tiny_tokenizer), tiny_tokenizer)
    saved = GenerationConfig.from_pretrained(tmp_path / "c")
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat == {"eos_token_id": [im_end], "stop_strings": []}  # <|im_end|> is caught by id
    assert saved.eos_token_id in (im_end, [im_end]) and not saved.stop_strings


def test_export_hf_verified(tiny_model_dir, tiny_tokenizer, adapter, tmp_path):
    out = tmp_path / "exported"
    record = export_adapter(adapter, out, base=str(tiny_model_dir), verify_prompts=4, verify_new_tokens=10)
    v = record["verification"]
    assert v["ids_identical"] == v["ids_checked"] == len(CHECK_CONVERSATIONS) + 4
    assert v["answers_identical"] == v["answers_checked"] == 4 and v["answers_source"] == "fixed prompts"
    on_disk = json.loads((out / "lorakit_export.json").read_text())
    assert on_disk["template"] == "alpaca" and on_disk["format"] == "hf" and on_disk["verification"] == v
    assert on_disk["stops"]["strings"] == ["### Instruction:", "### Input:", "### Response:"]
    assert not list(tmp_path.glob(".exported*"))
    # plain transformers: the folder's own chat template and generation config
    tok = AutoTokenizer.from_pretrained(out)
    gen_config = GenerationConfig.from_pretrained(out)
    assert gen_config.stop_strings == ["### Instruction:", "### Input:", "### Response:"]
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Who are you?"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert ids == prompt_ids_for(load_template("alpaca"), tiny_tokenizer, "Who are you?")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.stop_strings == gen_config.stop_strings
    # lorakit itself still reads the folder as a merged model with its template
    assert Generator(base=str(out)).template.name == "alpaca"


def test_failed_verification_leaves_nothing(tiny_model_dir, adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "exported_answers", lambda folder, t, prompts, n: ["different"] * len(prompts))
    out = tmp_path / "x"
    with pytest.raises(ExportError, match=r"0/3 greedy answers"):
        export_adapter(adapter, out, base=str(tiny_model_dir), verify_prompts=3, verify_new_tokens=4)
    assert list(tmp_path.iterdir()) == []
    # a chat template that renders another prompt fails on the ids, before any generation
    monkeypatch.setattr(export_mod, "export_chat_template", lambda t, tok: load_template("chat", tok).chat_template)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("old")
    with pytest.raises(ExportError, match="token ids differ"):
        export_adapter(adapter, out, base=str(tiny_model_dir), force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["x"] and os.listdir(out) == ["keep.txt"]


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", "export", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "case, needle",
    [("missing", "not a folder"), ("exists", "not empty"), ("to", "--to: 'onnx'"), ("dtype", "--dtype")],
)
def test_cli_bad_args(case, needle, adapter, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    args = {
        "missing": ["--adapter", tmp_path / "nope", "--out", tmp_path / "o"],
        "exists": ["--adapter", adapter, "--out", tmp_path / "full"],
        "to": ["--adapter", adapter, "--to", "onnx", "--out", tmp_path / "o"],
        "dtype": ["--adapter", adapter, "--dtype", "int3", "--out", tmp_path / "o"],
    }[case]
    r = _cli(*args, cwd=tmp_path)
    assert "Traceback" not in r.stdout + r.stderr
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "o").exists()
