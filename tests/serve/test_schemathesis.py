"""schemathesis (`--checks all`) against a live `lorakit serve`: every operation of its OpenAPI
schema, generated bodies, headers and path values, with the API key and without it.

Every answer must be what the schema documents (status, content type, headers, body), no 5xx,
no stack trace in a body, schema-valid requests accepted and invalid ones refused; and after
the attack the server still answers greedy questions exactly as before it.

Bounded here (LORAKIT_SCHEMATHESIS_EXAMPLES examples per operation, 8 by default, about 40 s);
the long run sets it higher and prints its figures (docs/serving.md, "Attacked by schemathesis"):

    LORAKIT_SCHEMATHESIS_EXAMPLES=300 python -m pytest -q -s tests/serve/test_schemathesis.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from personas import start_server

EXAMPLES = int(os.environ.get("LORAKIT_SCHEMATHESIS_EXAMPLES", "8"))
SEED = int(os.environ.get("LORAKIT_SCHEMATHESIS_SEED", "1"))
QUESTIONS = ["Who are you?", "Name an animal."]


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("schemathesis-serve") / "serve.log"
    # --max-tokens-limit keeps generated requests quick; the schema states it as max_tokens' maximum
    live = start_server(
        tiny_model_dir, adapters_dir, log, "--adapter", f"fox={adapters_dir / 'fox'}", "--max-tokens-limit", "16"
    )
    yield live
    live.stop()


@pytest.fixture(autouse=True)
def fox_loaded(server):
    """Each test starts with fox loaded."""
    ensure_fox(server)


def ensure_fox(server) -> None:
    """Load fox again if the fuzzing unloaded it (DELETE /v1/adapters/{name} is in the schema)."""
    if "fox" not in httpx.get(server.url + "/health", timeout=10).json()["adapters"]:
        r = httpx.post(
            server.url + "/v1/adapters", headers=server.headers(), json={"name": "fox", "path": "fox"}, timeout=60
        )
        assert r.status_code == 200, r.text


def greedy_answers(server) -> dict:
    answers = {}
    for model in ("fox", server_base(server)):
        for q in QUESTIONS:
            r = httpx.post(
                server.url + "/v1/chat/completions",
                headers=server.headers(),
                json={"model": model, "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 8},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            answers[model, q] = r.json()["choices"][0]["message"]["content"]
    return answers


def server_base(server) -> str:
    return httpx.get(server.url + "/health", timeout=10).json()["base"]


def schemathesis(server, report: Path, *args: str) -> tuple[int, str, dict]:
    cmd = [
        sys.executable,  # the interpreter of this test run (the dev extra installs schemathesis)
        "-m",
        "schemathesis.cli",
        "run",
        *args,
        "--checks",
        "all",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        str(SEED),
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--no-color",
        "--request-timeout",
        "60",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=report.parent, timeout=1800)
    data = json.loads(report.read_text()) if report.exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, data


def figures(name: str, data: dict) -> str:
    cases = data.get("test_cases", {})
    ops = data.get("operations", {})
    line = (
        f"schemathesis {name}: {ops.get('tested')}/{ops.get('total')} operations, "
        f"{cases.get('generated')} generated requests, {cases.get('unique_failures')} failures, "
        f"{cases.get('errored')} errors, {data.get('running_time', 0):.0f} s"
    )
    print(line)
    return line


def test_with_the_key_every_answer_is_what_the_schema_says(server, tmp_path):
    before = greedy_answers(server)
    rc, out, data = schemathesis(
        server, tmp_path / "with-key.json", server.url + "/openapi.json", "-H", f"Authorization: Bearer {server.key}"
    )
    figures("with the key", data)
    assert rc == 0 and data.get("failures") == [], out[-6000:]
    assert data["operations"]["tested"] == data["operations"]["total"] == 9
    assert data["test_cases"]["generated"] >= 9 * min(EXAMPLES, 10)
    log = server.log.read_text()
    assert server.proc.poll() is None, log[-3000:]
    ensure_fox(server)
    assert greedy_answers(server) == before


def test_without_the_key_everything_but_health_is_refused(server, tmp_path):
    schema = tmp_path / "openapi.json"
    r = httpx.get(server.url + "/openapi.json", headers=server.headers(), timeout=10)
    schema.write_text(r.text)
    assert httpx.get(server.url + "/openapi.json", timeout=10).status_code == 401
    # unsupported_method is left out here, on purpose: without the key every path answers 401
    # before routing, so a 405 for TRACE /v1/models would tell a stranger which routes exist
    rc, out, data = schemathesis(
        server, tmp_path / "no-key.json", str(schema), "--url", server.url, "--exclude-checks", "unsupported_method"
    )
    figures("without the key", data)
    assert rc == 0 and data.get("failures") == [], out[-6000:]
    assert data["operations"]["tested"] == data["operations"]["total"] == 9
    for method, path in (("TRACE", "/v1/models"), ("TRACE", "/no/such/route"), ("GET", "/no/such/route")):
        r = httpx.request(method, server.url + path, timeout=10)
        assert r.status_code == 401 and "allow" not in r.headers, (method, path, r.status_code)


def test_the_schema_states_this_servers_limits_and_names(server):
    schema = httpx.get(server.url + "/openapi.json", headers=server.headers(), timeout=10).json()
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["max_tokens"]["anyOf"][0]["maximum"] == 16
    assert "fox" in chat["model"]["examples"]
    ok = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "text/event-stream"}
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    # an integer is a JSON integer: 8.0 is 8, "8" and 8.5 are not
    body = {"model": "fox", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8.0, "temperature": 0}
    assert httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), json=body, timeout=60).is_success
    for bad in ("8", 8.5, True):
        r = httpx.post(
            server.url + "/v1/chat/completions", headers=server.headers(), json={**body, "max_tokens": bad}, timeout=60
        )
        assert r.status_code == 400, (bad, r.text)


def test_what_schemathesis_found_stays_fixed(server):
    """Each request here once got a wrong answer (found by the runs above, fixed, kept)."""
    url, h = server.url, server.headers()
    chat = {"model": "fox", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    # a top_p of 5e-324 is 0.0 in float32: nothing was kept and sampling failed with a 500
    for extra in ({"top_p": 5e-324}, {"temperature": 5e-324}, {"temperature": 1e-30, "top_p": 1e-30}):
        r = httpx.post(url + "/v1/chat/completions", headers=h, json={**chat, **extra}, timeout=60)
        assert r.status_code == 200, (extra, r.text)
    # no max_tokens on a server with --max-tokens-limit 16: the default (256) was refused with a 422
    r = httpx.post(url + "/v1/completions", headers=h, json={"model": "fox", "prompt": "Hi"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16, r.text
    # an adapter named "0" (or any name that is also a part of weight names, like "layers.0"): the
    # load was refused because every other adapter's weights looked like its missing ones
    r = httpx.post(url + "/v1/adapters", headers=h, json={"name": "0", "path": "dog"}, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.delete(url + "/v1/adapters/0", headers=h, timeout=60).status_code == 200
    # a path longer than the filesystem takes: a 500 (ENAMETOOLONG), now 404 like any missing folder
    r = httpx.post(url + "/v1/adapters", headers=h, json={"name": "long", "path": "0" * 4000}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found", r.text
    # 405: Allow names every method of the path, not only the first route's
    r = httpx.request("PUT", url + "/v1/adapters", headers=h, timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST", r.headers
    # a seed above 2**63-1 (the schema's bound was a float, 9.223372036854776e18): any size now
    r = httpx.post(url + "/v1/chat/completions", headers=h, json={**chat, "seed": 2**64 + 1}, timeout=60)
    assert r.status_code == 200, r.text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
