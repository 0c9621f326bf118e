"""lorakit export --to hf on the tiny random Llama: the exported tokenizer's chat template gives
lorakit's prompt ids, generation_config stops where lorakit stops, greedy answers match, and a
failed verification keeps the export marked unverified, any other error leaves nothing behind."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from process_helpers import kill_when
from random_adapter import make_random_adapter
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lorakit.data.records import Turn
from lorakit.data.templates import load_template
from lorakit.infer import export as export_mod
from lorakit.infer.export import (
    CHECK_CONVERSATIONS,
    check_prompt_ids,
    export,
    export_chat_template,
    messages_for,
    write_generation_config,
)
from lorakit.infer.generate import Generator, prompt_ids_for
from lorakit.infer.verify import THRESHOLDS, Conversation, VerificationFailed
from lorakit.runfolder import EXPORT_RECORD, MANIFEST, UNVERIFIED_MARKER

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
    record = export(adapter, out, base=str(tiny_model_dir), verify_prompts=4, verify_new_tokens=10)
    v = record["verification"]
    assert record["verified"] and v["passed"]
    assert v["template_identical"] == v["template_checked"] == len(CHECK_CONVERSATIONS) + 4
    assert v["greedy_identical"] == v["prompts"] == 4 and v["prompts_source"].startswith("fixed prompts")
    assert v["top1_agreement"] >= 0.99 and 0 <= v["mean_kl"] < 1e-3 and v["tokens_compared"] > 0, v
    assert (v["min_greedy_identical_share"], v["min_top1_agreement"]) == THRESHOLDS["hf"]
    on_disk = json.loads((out / EXPORT_RECORD).read_text())
    assert on_disk["template"] == "alpaca" and on_disk["format"] == "hf" and on_disk["verification"] == v
    assert on_disk["stops"]["strings"] == ["### Instruction:", "### Input:", "### Response:"]
    # every deployed file with its size and sha256, and the versions it was made with
    (weights,) = on_disk["files"]
    data = (out / weights["name"]).read_bytes()
    assert weights["bytes"] == len(data) and weights["sha256"] == hashlib.sha256(data).hexdigest()
    assert on_disk["versions"]["lorakit"] and on_disk["versions"]["transformers"]
    assert not (out / UNVERIFIED_MARKER).exists()
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


def test_export_is_recorded_in_the_adapter_manifest(tiny_model_dir, adapter, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter, run)
    (run / MANIFEST).write_text(json.dumps({"base_model": str(tiny_model_dir), "template": "alpaca"}))
    record = export(run, tmp_path / "out", verify_prompts=2, verify_new_tokens=4)
    (entry,) = json.loads((run / MANIFEST).read_text())["exports"]
    assert entry["format"] == "hf" and entry["verified"] is True and entry["out"] == str((tmp_path / "out").resolve())
    assert (
        entry["files"] == record["files"]
        and entry["figures"]["top1_agreement"] == record["verification"]["top1_agreement"]
    )
    assert entry["versions"]["lorakit"] and record["manifest"] == "recorded"
    # a plain peft adapter has no lorakit manifest: said, not invented
    record = export(adapter, tmp_path / "out2", base=str(tiny_model_dir), verify=False)
    assert "no lorakit manifest.json" in record["manifest"] and not (adapter / MANIFEST).exists()
    assert record["verified"] is False and "--no-verify" in record["verification_note"]


def _diverging_candidate(real):
    """hf_candidate whose answers all differ and whose logits prefer another token."""

    def candidate(folder, template, reference):
        answers, logits, tps = real(folder, template, reference)
        return ["different"] * len(answers), [torch.roll(x, 1, dims=-1) for x in logits], tps

    return candidate


def test_failed_verification_keeps_the_export_marked_unverified(tiny_model_dir, adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "hf_candidate", _diverging_candidate(export_mod.hf_candidate))
    out = tmp_path / "x"
    with pytest.raises(VerificationFailed, match=r"greedy answers identical 0/3.*top-1 agreement.*kept at") as e:
        export(adapter, out, base=str(tiny_model_dir), verify_prompts=3, verify_new_tokens=4)
    assert e.value.exit_code == 1 and e.value.figures["top1_agreement"] < 0.5
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["verified"] is False and record["verification"]["passed"] is False
    assert record["verification"]["greedy_identical"] == 0 and "0/3" in record["verification"]["error"]
    assert "do not deploy" in (out / UNVERIFIED_MARKER).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no staging folder left


def test_template_mismatch_fails_and_an_error_leaves_nothing(tiny_model_dir, adapter, tmp_path, monkeypatch):
    # a chat template that renders another prompt fails on the ids, before any generation
    monkeypatch.setattr(export_mod, "export_chat_template", lambda t, tok: load_template("chat", tok).chat_template)
    with pytest.raises(VerificationFailed, match="token ids differ"):
        export(adapter, tmp_path / "bad", base=str(tiny_model_dir), verify_prompts=2)
    assert (tmp_path / "bad" / UNVERIFIED_MARKER).is_file()
    # any other error (here: the weights cannot be written) leaves --out as it was, and no staging folder
    monkeypatch.setattr(export_mod, "save_merged", lambda merged, folder: (_ for _ in ()).throw(OSError("disk full")))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        export(adapter, tmp_path / "x", base=str(tiny_model_dir), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "x"] and os.listdir(tmp_path / "x") == ["keep.txt"]


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


@pytest.mark.heavy  # a .ci/run step of its own (pyproject: markers)
def test_kill_9_during_export_leaves_no_output(tiny_model_dir, adapter, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lorakit.cli", "export", "--adapter", str(adapter), "--base", str(tiny_model_dir)]
    cmd += ["--to", "hf", "--out", str(out), "--verify-prompts", "2"]
    # killed once the merged weights are written and the verification runs
    kill_when(cmd, ".killed.exporting-*", tmp_path, lambda p: (p / "model.safetensors").exists(), tmp_path)
    assert not out.exists()
    (stale,) = tmp_path.glob(".killed.exporting-*")  # the killed process could not clean up ...
    record = export(adapter, out, base=str(tiny_model_dir), verify_prompts=2, verify_new_tokens=4)
    assert record["verified"] and (out / EXPORT_RECORD).is_file()
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["killed"]  # ... the next export did
