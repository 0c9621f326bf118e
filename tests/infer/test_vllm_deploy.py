"""`lorakit export --to vllm` and `lorakit serve --engine vllm` without vLLM: the deploy folder's
contents (launch.sh run with a stand-in Python that records the command it is given, the chat
template rendered by transformers against lorakit's prompt ids, the k8s manifests), the
portability refusals (one error line each, nothing written), the serve flags. The real vLLM run is
tests/infer/test_vllm_e2e.py (marker vllm)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from random_adapter import make_random_adapter
from test_cli import assert_user_error, lorakit

from lorakit.runfolder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEPLOY_ADAPTERS,
    DEPLOY_CHAT_TEMPLATE,
    DEPLOY_K8S,
    DEPLOY_LAUNCH,
    DEPLOY_README,
    EXPORT_RECORD,
    INT8_WEIGHTS,
    MANIFEST,
    TEMPLATE_RECORD,
)

# A stand-in for vLLM's Python: answers the version probe, else records its argv and environment
# (JSON in $FAKE_VLLM_RECORD) and exits with $FAKE_VLLM_EXIT, or waits for SIGINT when asked.
FAKE_VLLM = """#!/usr/bin/env python3
import json, os, signal, sys, time
if sys.argv[1:2] == ["-c"]:
    print("0.32.0")
    sys.exit(0)
record = {"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if "VLLM" in k or "API_KEY" in k}}
if os.environ.get("FAKE_VLLM_TEMPLATE_COPY"):
    t = sys.argv[sys.argv.index("--chat-template") + 1]
    record["template_text"] = open(t).read()
with open(os.environ["FAKE_VLLM_RECORD"], "w") as f:
    json.dump(record, f)
if os.environ.get("FAKE_VLLM_WAIT"):
    signal.signal(signal.SIGINT, lambda *a: sys.exit(42))
    time.sleep(120)
sys.exit(int(os.environ.get("FAKE_VLLM_EXIT", "0")))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("lorakit-home")  # no vLLM venv in it
    return {
        **{k: v for k, v in os.environ.items() if k not in ("LORAKIT_VLLM_PYTHON", "LORAKIT_VLLM_VENV")},
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "COLUMNS": "200",
        "LORAKIT_HOME": str(home),
    }


@pytest.fixture(scope="module")
def fake_vllm(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fake-vllm") / "python"
    path.write_text(FAKE_VLLM.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-unit")
    found = {}
    for seed, name, r in ((1, "support", 4), (2, "persona", 16)):
        folder = make_random_adapter(tiny_model_dir, root / name / "adapter", seed=seed, r=r)
        (folder / MANIFEST).write_text(json.dumps({"base_model": str(tiny_model_dir), "template": "alpaca"}))
        found[name] = folder
    return found


@pytest.fixture(scope="module")
def deploy(adapters, env, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("deploy")
    r = lorakit(
        "export",
        "--to",
        "vllm",
        "--adapter",
        f"support={adapters['support']}",
        "--adapter",
        str(adapters["persona"]),  # named after its run folder: persona
        "--out",
        "deploy",
        "--no-verify",
        cwd=cwd,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NOT verified (--no-verify)" in r.stdout and "launch.sh" in r.stdout, r.stdout
    return cwd / "deploy"


def _variant(adapter: Path, tmp_path: Path, **config) -> Path:
    folder = tmp_path / "variant"
    shutil.copytree(adapter, folder)
    path = folder / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


# ---- the deploy folder ---------------------------------------------------------------------------


def test_deploy_folder_holds_every_adapter_the_template_launch_sh_and_k8s(deploy, adapters):
    for name in ("support", "persona"):
        for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TEMPLATE_RECORD, MANIFEST):
            assert (deploy / DEPLOY_ADAPTERS / name / f).is_file(), (name, f)
    assert (deploy / DEPLOY_ADAPTERS / "persona" / ADAPTER_WEIGHTS).read_bytes() == (
        adapters["persona"] / ADAPTER_WEIGHTS
    ).read_bytes()
    record = json.loads((deploy / EXPORT_RECORD).read_text())
    assert record["format"] == "vllm" and record["verified"] is False and record["verification"] is None
    assert record["max_lora_rank"] == 16 and record["max_loras"] == 2  # r=4 and r=16 -> vLLM's 16
    assert [a["name"] for a in record["adapters"]] == ["support", "persona"]
    assert record["client_stop"] == ["### Instruction:", "### Input:", "### Response:"]
    assert subprocess.run(["bash", "-n", deploy / DEPLOY_LAUNCH]).returncode == 0
    assert os.access(deploy / DEPLOY_LAUNCH, os.X_OK)
    text = (deploy / DEPLOY_README).read_text()
    assert 'model="support"' in text and "stop=" in text and "bash launch.sh" in text


def test_launch_sh_runs_the_exact_vllm_command(deploy, fake_vllm, tmp_path):
    """launch.sh run from another folder with a stand-in Python: every flag, the paths inside the
    deploy folder, extra flags passed through, the key in the environment and never in argv."""
    out = tmp_path / "argv.json"
    env = {
        **os.environ,
        "VLLM_PYTHON": str(fake_vllm),
        "FAKE_VLLM_RECORD": str(out),
        "PORT": "8765",
        "LORAKIT_API_KEY": "sesame",
    }
    r = subprocess.run(["bash", deploy / DEPLOY_LAUNCH, "--max-model-len", "2048"], env=env, cwd=tmp_path)
    assert r.returncode == 0
    seen = json.loads(out.read_text())
    argv, here = seen["argv"], str(deploy.resolve())
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]

    def flag(name):
        return argv[argv.index(name) + 1]

    assert flag("--max-lora-rank") == "16" and flag("--max-loras") == "2" and "--enable-lora" in argv
    i = argv.index("--lora-modules")
    assert argv[i + 1 : i + 3] == [f"support={here}/adapters/support", f"persona={here}/adapters/persona"]
    assert flag("--chat-template") == f"{here}/{DEPLOY_CHAT_TEMPLATE}"
    assert flag("--host") == "127.0.0.1" and flag("--port") == "8765" and flag("--dtype") == "auto"
    assert Path(flag("--model")).is_dir() and flag("--served-model-name")
    assert argv[-2:] == ["--max-model-len", "2048"]
    assert seen["env"]["VLLM_API_KEY"] == "sesame" and "sesame" not in argv
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in seen["env"]


def test_the_chat_template_renders_lorakits_prompt_ids(deploy, tiny_model_dir):
    """What vLLM renders (transformers' apply_chat_template with chat_template.jinja) is, token for
    token, lorakit's prompt for the adapters' template, for every check conversation as a chat user
    sends it."""
    from transformers import AutoTokenizer

    from lorakit.data.templates import resolve_template
    from lorakit.infer.export import CHECK_CONVERSATIONS, messages_for
    from lorakit.infer.generate import prompt_ids_for
    from lorakit.infer.vllm_deploy import chat_conversation

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = resolve_template(adapter=deploy / DEPLOY_ADAPTERS / "support", tokenizer=tokenizer)
    assert template.name == "alpaca"
    tokenizer.chat_template = (deploy / DEPLOY_CHAT_TEMPLATE).read_text()
    for conv in map(chat_conversation, CHECK_CONVERSATIONS):
        got = tokenizer.apply_chat_template(
            messages_for(template, conv), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        assert list(got) == prompt_ids_for(template, tokenizer, conv.instruction, "", list(conv.history), conv.system)


def test_k8s_manifests_for_one_gpu_node(deploy):
    docs = {name: yaml.safe_load((deploy / DEPLOY_K8S / name).read_text()) for name in os.listdir(deploy / DEPLOY_K8S)}
    assert {d["kind"] for d in docs.values()} == {"Deployment", "Service", "PersistentVolumeClaim"}
    container = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "support=/deploy/adapters/support" in args and "/deploy/chat_template.jinja" in args
    assert args[args.index("--host") + 1] == "0.0.0.0" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "api-key"  # the key from a Secret
    assert container["image"].startswith("vllm/vllm-openai:")
    assert "&id" not in (deploy / DEPLOY_K8S / "deployment.yaml").read_text()  # no YAML anchors
    claim = docs["deployment.yaml"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["pvc.yaml"]["metadata"]["name"]


def test_runtime_lora_and_served_name(adapters, env, tmp_path, fake_vllm):
    r = lorakit(
        "export",
        "--to",
        "vllm",
        "--adapter",
        f"support={adapters['support']}",
        "--out",
        tmp_path / "d",
        "--no-verify",
        "--runtime-lora",
        "--served-model-name",
        "tiny",
        "--max-lora-rank",
        "64",
        "--dtype",
        "bfloat16",
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "argv.json"
    run_env = {**os.environ, "VLLM_PYTHON": str(fake_vllm), "FAKE_VLLM_RECORD": str(out)}
    assert subprocess.run(["bash", tmp_path / "d" / DEPLOY_LAUNCH], env=run_env).returncode == 0
    seen = json.loads(out.read_text())
    argv = seen["argv"]
    assert argv[argv.index("--served-model-name") + 1] == "tiny" and argv[argv.index("--max-lora-rank") + 1] == "64"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert seen["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


# ---- refusals: one line, exit 2, nothing written ---------------------------------------------------


def _export(tmp_path, env, *args):
    out = tmp_path / "out"
    r = lorakit("export", "--to", "vllm", *args, "--out", out, "--no-verify", cwd=tmp_path, env=env)
    assert not out.exists()
    return r


def _refused(*specs, base=None, max_lora_rank=None) -> str:
    """The plan's refusal line (in-process: the same check_adapters the command runs first)."""
    from lorakit.infer.vllm_deploy import VllmError, plan

    with pytest.raises(VllmError) as e:
        plan(list(specs), base, max_lora_rank=max_lora_rank)
    return str(e.value)


@pytest.mark.parametrize(
    "config, needles",
    [
        ({"use_dora": True}, ("DoRA", "lorakit serve")),
        ({"modules_to_save": ["lm_head"]}, ("modules_to_save: lm_head",)),
        ({"lora_bias": True}, ("biases",)),
        ({"init_lora_weights": "pissa_niter_4"}, ("pissa", "changes the base weights")),
        ({"r": 600}, ("rank 600", "512")),
        ({"trainable_token_indices": [1, 2]}, ("token embeddings",)),
    ],
)
def test_what_vllm_cannot_load_is_refused(adapters, tmp_path, config, needles):
    folder = _variant(adapters["support"], tmp_path, **config)
    line = _refused(f"x={folder}")
    for needle in (f"--adapter x={folder}", *needles):
        assert needle in line, line


def test_a_refusal_through_the_command_is_one_line_and_writes_nothing(adapters, tmp_path, env):
    folder = _variant(adapters["support"], tmp_path, use_dora=True)
    assert_user_error(_export(tmp_path, env, "--adapter", f"x={folder}"), f"--adapter x={folder}", "DoRA")


def test_int8_adapter_refused(adapters, tmp_path):
    folder = _variant(adapters["support"], tmp_path)
    (folder / ADAPTER_WEIGHTS).rename(folder / INT8_WEIGHTS)
    assert "int8 adapter" in _refused(f"x={folder}")


def test_rank_above_the_flag_and_a_flag_vllm_lacks(adapters):
    persona = f"p={adapters['persona']}"
    assert "rank 16 is above --max-lora-rank 8" in _refused(persona, max_lora_rank=8)
    assert "--max-lora-rank 12" in _refused(persona, max_lora_rank=12)


def test_adapters_of_another_base_refused(adapters, tmp_path, env):
    folder = _variant(adapters["persona"], tmp_path)
    (folder / MANIFEST).write_text(json.dumps({"base_model": "org/another-model"}))
    line = assert_user_error(
        _export(tmp_path, env, "--adapter", f"a={adapters['support']}", "--adapter", f"b={folder}"),
        "org/another-model",
        "one base",
    )
    assert "--adapter b=" in line


def test_an_alias_and_its_cache_folder_are_one_base(adapters, tmp_path, monkeypatch):
    from lorakit.infer.vllm_deploy import check_adapters

    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    alias_folder = tmp_path / "models" / "smollm2-135m"
    alias_folder.mkdir(parents=True)
    folder = _variant(adapters["persona"], tmp_path)
    (folder / MANIFEST).write_text(json.dumps({"base_model_path": str(alias_folder)}))
    base, found = check_adapters([f"b={folder}"], "smollm2-135m")
    assert base == "smollm2-135m" and [a.name for a in found] == ["b"]


def test_adapters_of_different_templates_refused(adapters, tmp_path):
    from lorakit.data.templates import load_template

    folder = _variant(adapters["persona"], tmp_path)
    load_template("alpaca_short").save(folder)
    line = _refused(f"a={adapters['support']}", f"b={folder}")
    assert "alpaca_short" in line and "one chat template" in line, line


@pytest.mark.parametrize(
    "specs, needle",
    [
        (["a=X", "a=Y"], "given twice"),
        (["bad name=X"], "the name must be"),
        (["a=/no/such/folder"], "/no/such/folder"),
    ],
)
def test_bad_adapter_arguments(specs, needle):
    from lorakit.errors import LorakitError
    from lorakit.infer.vllm_deploy import check_adapters

    with pytest.raises(LorakitError, match=needle):
        check_adapters(specs)


def test_vllm_options_belong_to_vllm(adapters, tmp_path, env):
    one = str(adapters["support"])
    for extra, needle in (
        (["--to", "hf", "--vllm-python", "python3"], "--vllm-python: only for --to vllm"),
        (["--to", "hf", "--adapter", one], "exports one adapter"),
        (["--to", "gguf", "--runtime-lora"], "--runtime-lora: only for --to vllm"),
    ):
        r = lorakit("export", "--adapter", one, *extra, "--out", tmp_path / "o", cwd=tmp_path, env=env)
        assert_user_error(r, needle)
        assert not (tmp_path / "o").exists()


def test_verification_without_vllm_is_one_line_before_any_work(adapters, tmp_path, env):
    r = lorakit(
        "export",
        "--to",
        "vllm",
        "--adapter",
        f"a={adapters['support']}",
        "--out",
        tmp_path / "o",
        cwd=tmp_path,
        env=env,
    )
    assert_user_error(r, "vLLM not found", "install-vllm-cpu.sh", "--vllm-python")
    assert not (tmp_path / "o").exists()
    r = lorakit(
        "export",
        "--to",
        "vllm",
        "--adapter",
        f"a={adapters['support']}",
        "--out",
        tmp_path / "o",
        "--vllm-python",
        tmp_path / "none",
        cwd=tmp_path,
        env=env,
    )
    assert_user_error(r, "--vllm-python", "no such Python")


def test_names_and_ranks():
    from lorakit.infer.vllm_deploy import lora_rank_flag, parse_adapters

    assert [lora_rank_flag(r) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    assert parse_adapters(["runs/lorakit-demo/adapter", "x=a/b", "c/d"]) == [
        ("lorakit-demo", Path("runs/lorakit-demo/adapter")),
        ("x", Path("a/b")),
        ("d", Path("c/d")),
    ]


# ---- lorakit serve --engine vllm ---------------------------------------------------------------------


def test_serve_engine_vllm_runs_the_same_command_in_the_foreground(adapters, tiny_model_dir, env, fake_vllm, tmp_path):
    out = tmp_path / "argv.json"
    run_env = {
        **env,
        "LORAKIT_VLLM_PYTHON": str(fake_vllm),
        "FAKE_VLLM_RECORD": str(out),
        "FAKE_VLLM_EXIT": "3",
        "FAKE_VLLM_TEMPLATE_COPY": "1",
    }
    r = lorakit(
        "serve",
        "--engine",
        "vllm",
        "--base",
        tiny_model_dir,
        "--adapter",
        f"support={adapters['support']}",
        "--api-key",
        "sesame",
        "--max-batch-size",
        "4",
        "--port",
        "8123",
        cwd=tmp_path,
        env=run_env,
    )
    assert r.returncode == 3, r.stderr  # vLLM's exit code is the command's
    assert "starting vLLM 0.32.0" in r.stderr and "template alpaca" in r.stderr, r.stderr
    seen = json.loads(out.read_text())
    argv = seen["argv"]
    assert argv[argv.index("--lora-modules") + 1] == f"support={adapters['support'].resolve()}"
    assert argv[argv.index("--max-num-seqs") + 1] == "4" and argv[argv.index("--port") + 1] == "8123"
    assert "Below is an instruction" in seen["template_text"]  # the adapter's alpaca template
    assert seen["env"]["VLLM_API_KEY"] == "sesame" and "sesame" not in argv


def test_serve_engine_vllm_passes_ctrl_c_on(adapters, tiny_model_dir, env, fake_vllm, tmp_path):
    out = tmp_path / "argv.json"
    run_env = {**env, "LORAKIT_VLLM_PYTHON": str(fake_vllm), "FAKE_VLLM_RECORD": str(out), "FAKE_VLLM_WAIT": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit.cli", "serve", "--engine", "vllm", "--base", str(tiny_model_dir)],
        env=run_env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert out.exists(), proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 42  # the stand-in's answer to SIGINT, passed back


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--engine", "vllm", "--max-queue", "5"], "--max-queue: lorakit serve's own option"),
        (["--engine", "tgi"], "--engine tgi"),
        (["--vllm-python", "python3"], "--vllm-python: only with --engine vllm"),
        (["--engine", "vllm", "--port", "99999"], "--port 99999"),
    ],
)
def test_serve_engine_refusals(tiny_model_dir, env, fake_vllm, tmp_path, args, needle):
    r = lorakit(
        "serve", "--base", tiny_model_dir, *args, cwd=tmp_path, env={**env, "LORAKIT_VLLM_PYTHON": str(fake_vllm)}
    )
    assert_user_error(r, needle)
