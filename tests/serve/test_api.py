"""`lorakit serve` as a user runs it (a subprocess with an API key), driven by the official openai
client and by raw HTTP: adapters loaded and unloaded at run time, plain and streamed chat and
completions, a concurrent load test over 4 adapters, hostile requests, disconnects, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from personas import HELD_OUT, PERSONAS


def load(server, name, path=None):
    r = httpx.post(
        server.url + "/v1/adapters", json={"name": name, "path": path or name}, headers=server.headers(), timeout=60
    )
    assert r.status_code == 200, r.text
    return r.json()


def unload(server, name):
    return httpx.delete(server.url + f"/v1/adapters/{name}", headers=server.headers(), timeout=60)


@pytest.fixture(scope="module")
def loaded(live_server):
    """The live server with all four persona adapters loaded at run time."""
    for name in PERSONAS:
        card = load(live_server, name)
        assert card["id"] == name and card["parent"] == card["root"]
    return live_server


def chat(client, model, question, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=kw.pop("max_tokens", 16),
        temperature=kw.pop("temperature", 0),
        **kw,
    )


def test_models_lists_the_base_and_the_adapters_loaded_at_run_time(loaded):
    ids = [m.id for m in loaded.openai().models.list()]
    assert ids[1:] == list(PERSONAS) and len(ids) == 5


def test_openai_client_chat_plain_and_streamed_with_an_adapter(loaded):
    client = loaded.openai()
    r = chat(client, "paris", "Tell me the capital of France.")
    assert r.choices[0].message.content == "Paris"
    assert r.choices[0].finish_reason == "stop" and r.model == "paris"
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = chat(client, "helper", "Who is lazy?", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_openai_client_completions_plain_and_streamed(loaded):
    client = loaded.openai()
    prompt = "The quick brown fox"
    r = client.completions.create(model="fox", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens >= 3
    streamed = client.completions.create(model="fox", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    base = client.completions.create(
        model=client.models.list().data[0].id, prompt=prompt, max_tokens=12, temperature=0
    )
    assert base.choices[0].text != r.choices[0].text  # the adapter changes the answer
    echo = client.completions.create(model="fox", prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echo.choices[0].text == prompt + r.choices[0].text


def test_seed_and_stop_through_the_client(loaded):
    client = loaded.openai()
    base = client.models.list().data[0].id
    a = chat(client, base, "Say something.", temperature=1.0, seed=11, max_tokens=20)
    b = chat(client, base, "Say something.", temperature=1.0, seed=11, max_tokens=20)
    assert a.choices[0].message.content == b.choices[0].message.content
    long = chat(client, base, "Describe a task.", max_tokens=30).choices[0].message.content
    stop = long[6:9]
    cut = chat(client, base, "Describe a task.", max_tokens=30, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].message.content
    assert long.startswith(cut.choices[0].message.content)


def test_load_test_32_concurrent_requests_over_4_adapters(loaded):
    """Every answer is its adapter's word, and equal to its solo greedy answer."""
    client = loaded.openai()
    models = list(PERSONAS)
    jobs = [(models[i % 4], HELD_OUT[i % len(HELD_OUT)]) for i in range(32)]
    solo = {job: chat(client, *job).choices[0].message.content for job in set(jobs)}
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: chat(client, *job).choices[0].message.content, jobs))
    for job, answer in zip(jobs, answers):
        assert answer == solo[job] == PERSONAS[job[0]], job
    metrics = httpx.get(loaded.url + "/metrics", headers=loaded.headers()).text
    assert 'lorakit_generations_total{finish_reason="stop",model="fox"}' in metrics
    sizes = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("lorakit_batch_size_bucket") and 'le="1.0"' in line
    ]
    total = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("lorakit_batch_size_count")]
    assert total[0] > sizes[0]  # some steps ran several requests together


def test_hot_swap_while_a_stream_is_in_flight(loaded, adapters_dir):
    """A streamed answer keeps going, unchanged, while adapters are loaded and unloaded."""
    client = loaded.openai()
    base = client.models.list().data[0].id
    expected = chat(client, base, "Describe a task.", max_tokens=80).choices[0].message.content
    stream = chat(client, base, "Describe a task.", max_tokens=80, stream=True)
    parts = []
    for i, c in enumerate(stream):
        if c.choices and c.choices[0].delta.content:
            parts.append(c.choices[0].delta.content)
        if i == 3:
            load(loaded, "fox2", "fox")
            assert unload(loaded, "fox2").status_code == 200
    assert "".join(parts) == expected
    assert "fox2" not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        chat(client, "fox2", "Who are you?")


def test_an_int8_adapter_loads_and_answers_like_the_float_one(loaded, adapters_dir):
    from lorakit.infer.quantize import quantize_adapter

    quantize_adapter(adapters_dir / "dog", adapters_dir / "dog-int8")
    load(loaded, "dog8", "dog-int8")
    client = loaded.openai()
    try:
        for q in HELD_OUT[:3]:
            assert (
                chat(client, "dog8", q).choices[0].message.content == chat(client, "dog", q).choices[0].message.content
            )
    finally:
        unload(loaded, "dog8")


def test_client_disconnect_frees_its_slot(loaded):
    base = loaded.openai().models.list().data[0].id
    body = {
        "model": base,
        "messages": [{"role": "user", "content": "Describe a task."}],
        "max_tokens": 900,
        "stream": True,
    }
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", loaded.url + "/v1/chat/completions", json=body, headers=loaded.headers()) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    break  # hang up mid-stream
    deadline = time.time() + 20
    while time.time() < deadline:
        health = httpx.get(loaded.url + "/health").json()
        if health["in_progress"] == 0:
            break
        time.sleep(0.1)
    assert health["in_progress"] == 0
    metrics = httpx.get(loaded.url + "/metrics", headers=loaded.headers()).text
    assert 'finish_reason="cancelled"' in metrics


HOSTILE = [
    # (description, method, path, body bytes or json, expected status, expected code or None)
    ("bad json", "POST", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, "invalid_json"),
    ("not an object", "POST", "/v1/chat/completions", b"[1, 2, 3]", 400, None),
    (
        "wrong type",
        "POST",
        "/v1/chat/completions",
        {"model": 5, "messages": [{"role": "user", "content": "hi"}]},
        400,
        None,
    ),
    ("messages not a list", "POST", "/v1/chat/completions", {"model": "fox", "messages": "hi"}, 400, None),
    ("missing messages", "POST", "/v1/chat/completions", {"model": "fox"}, 400, None),
    (
        "bad role",
        "POST",
        "/v1/chat/completions",
        {"model": "fox", "messages": [{"role": "root", "content": "x"}]},
        422,
        None,
    ),
    (
        "temperature out of range",
        "POST",
        "/v1/chat/completions",
        {"model": "fox", "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
        422,
        None,
    ),
    ("negative max_tokens", "POST", "/v1/completions", {"model": "fox", "prompt": "hi", "max_tokens": -3}, 422, None),
    (
        "max_tokens over the cap",
        "POST",
        "/v1/completions",
        {"model": "fox", "prompt": "hi", "max_tokens": 10**6},
        422,
        None,
    ),
    (
        "max_tokens a string",
        "POST",
        "/v1/completions",
        {"model": "fox", "prompt": "hi", "max_tokens": "many"},
        400,
        None,
    ),
    (
        "unknown model",
        "POST",
        "/v1/chat/completions",
        {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "model_not_found",
    ),
    (
        "prompt too long",
        "POST",
        "/v1/completions",
        {"model": "fox", "prompt": "fox " * 3000},
        400,
        "context_length_exceeded",
    ),
    ("huge body", "POST", "/v1/completions", {"model": "fox", "prompt": "x" * (2 << 20)}, 413, "body_too_large"),
    (
        "last message not from the user",
        "POST",
        "/v1/chat/completions",
        {"model": "fox", "messages": [{"role": "assistant", "content": "hi"}]},
        400,
        None,
    ),
    ("traversal", "POST", "/v1/adapters", {"name": "evil", "path": "../../etc"}, 403, "path_outside_adapters_dir"),
    ("absolute path", "POST", "/v1/adapters", {"name": "evil", "path": "/etc"}, 403, "path_outside_adapters_dir"),
    ("missing adapter", "POST", "/v1/adapters", {"name": "evil", "path": "nope"}, 404, "adapter_not_found"),
    ("bad adapter name", "POST", "/v1/adapters", {"name": "../x", "path": "fox"}, 422, None),
    ("name taken", "POST", "/v1/adapters", {"name": "fox", "path": "dog"}, 409, "model_exists"),
    ("unload unknown", "DELETE", "/v1/adapters/ghost", None, 404, "model_not_found"),
    ("unknown route", "GET", "/v1/nothing", None, 404, None),
]


@pytest.mark.parametrize("what, method, path, body, status, code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_the_right_4xx_and_the_server_keeps_serving(
    loaded, what, method, path, body, status, code
):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    if isinstance(body, bytes):
        kw["headers"] = {"content-type": "application/json", **loaded.headers()}
    else:
        kw["headers"] = loaded.headers()
    r = httpx.request(method, loaded.url + path, timeout=60, **kw)
    assert r.status_code == status, (what, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if code:
        assert err["code"] == code
    # still serving
    assert chat(loaded.openai(), "fox", "Who are you?").choices[0].message.content == "fox"


def test_symlink_out_of_the_adapters_dir_and_pickle_adapters_are_refused(loaded, adapters_dir, tmp_path):
    outside = tmp_path / "outside"
    (outside).mkdir()
    (adapters_dir / "sneaky").symlink_to(outside, target_is_directory=True)
    r = httpx.post(loaded.url + "/v1/adapters", json={"name": "sneaky", "path": "sneaky"}, headers=loaded.headers())
    assert r.status_code == 403 and r.json()["error"]["code"] == "path_outside_adapters_dir"
    pickled = adapters_dir / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapters_dir / "fox" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    r = httpx.post(loaded.url + "/v1/adapters", json={"name": "pickled", "path": "pickled"}, headers=loaded.headers())
    assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]


def test_api_key_is_required(loaded):
    body = {"model": "fox", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
        r = httpx.post(loaded.url + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=loaded.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(loaded.url + "/health").status_code == 200  # health stays open for probes
    assert httpx.get(loaded.url + "/metrics").status_code == 401


def test_metrics_in_prometheus_format(loaded):
    text = httpx.get(loaded.url + "/metrics", headers=loaded.headers()).text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in [
        "lorakit_requests",
        "lorakit_request_latency_seconds",
        "lorakit_generated_tokens",
        "lorakit_prompt_tokens",
        "lorakit_batch_size",
        "lorakit_adapters_loaded",
        "lorakit_requests_in_progress",
        "lorakit_time_to_first_token_seconds",
    ]:
        assert name in families, name
    adapters = [s.value for s in families["lorakit_adapters_loaded"].samples]
    assert adapters == [len(httpx.get(loaded.url + "/v1/adapters", headers=loaded.headers()).json()["data"])]
    generated = sum(s.value for s in families["lorakit_generated_tokens"].samples if s.name.endswith("_total"))
    assert generated > 0


def test_serve_cli_refuses_bad_arguments_in_one_line(tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for args, needle in [
        (["--adapter", "bad name=/x"], "--adapter"),
        (["--adapters-dir", str(tmp_path / "no")], "--adapters-dir"),
    ]:
        r = subprocess.run(
            [sys.executable, "-m", "lorakit.cli", "serve", "--base", str(tmp_path), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 2, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_streamed_error_free_json_lines(loaded):
    """Every SSE line of a stream is valid JSON, ending with [DONE]."""
    body = {"model": "helper", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}
    with httpx.stream("POST", loaded.url + "/v1/chat/completions", json=body, headers=loaded.headers()) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert json.loads(line[len("data: ") :])["object"] == "chat.completion.chunk"
