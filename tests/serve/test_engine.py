"""The serving engine in-process: continuous batching gives each request the answer it would get
alone, per-row sampling/stop/max_tokens, streaming deltas, cancellation, adapter hot-swap."""

from __future__ import annotations

import threading
import time

import pytest
from personas import HELD_OUT, PERSONAS

from lorakit.serve.engine import Engine, EngineError, Request


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapters_dir):
    e = Engine(str(tiny_model_dir), base_name="base", max_batch_size=8, max_queue=64)
    for name in PERSONAS:
        e.load_adapter(name, adapters_dir / name)
    yield e
    e.shutdown()


def ask(engine, model, question, **kw):
    return Request(
        prompt_ids=engine.chat_prompt_ids(model, [("user", question)]),
        model=model,
        adapter=None,
        max_tokens=kw.pop("max_tokens", 12),
        **kw,
    )


def wait_all(requests, timeout=120):
    for r in requests:
        assert r.done.wait(timeout), "a request never finished"
    return requests


def test_adapters_answer_their_word_and_the_base_does_not(engine):
    for name, word in PERSONAS.items():
        r = wait_all([engine.submit(ask(engine, name, "Who is lazy?"))])[0]
        assert r.text == word and r.finish_reason == "stop", (name, r.text)
    base = wait_all([engine.submit(ask(engine, "base", "Who is lazy?"))])[0]
    assert base.text not in PERSONAS.values()


def test_mixed_batch_equals_solo_greedy(engine):
    """32 requests over the base and 4 adapters, submitted at once, answer as they do alone."""
    models = ["base"] + list(PERSONAS)
    jobs = [(models[i % len(models)], HELD_OUT[i % len(HELD_OUT)]) for i in range(32)]
    solo = {}
    for job in set(jobs):
        solo[job] = wait_all([engine.submit(ask(engine, *job, max_tokens=16))])[0].text
    batch_sizes = []
    original = engine._decode

    def counting(batch):
        batch_sizes.append(len(batch.rows))
        return original(batch)

    engine._decode = counting
    try:
        reqs = [engine.submit(ask(engine, *job, max_tokens=16)) for job in jobs]
        wait_all(reqs)
    finally:
        engine._decode = original
    for job, r in zip(jobs, reqs):
        assert r.text == solo[job], job
        if job[0] != "base":
            assert r.text == PERSONAS[job[0]]
    assert max(batch_sizes) == 8  # they really shared steps


def test_a_request_joins_a_running_batch_and_a_short_one_leaves_early(engine):
    long = engine.submit(ask(engine, "base", "Describe a task.", max_tokens=60))
    while not long.ids:
        time.sleep(0.001)
    short = engine.submit(ask(engine, "fox", "Who are you?"))
    assert short.done.wait(60)
    assert short.text == "fox"
    assert not long.finished  # the short one did not wait for the long one
    wait_all([long])
    assert long.finish_reason == "length" and len(long.ids) == 60
    solo = wait_all([engine.submit(ask(engine, "base", "Describe a task.", max_tokens=60))])[0]
    assert long.text == solo.text


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    alone = wait_all([engine.submit(ask(engine, "base", "Say something.", temperature=1.0, seed=7, max_tokens=20))])[0]
    crowd = [
        engine.submit(ask(engine, "base", q, temperature=1.0, seed=i, max_tokens=20)) for i, q in enumerate(HELD_OUT)
    ]
    again = engine.submit(ask(engine, "base", "Say something.", temperature=1.0, seed=7, max_tokens=20))
    wait_all(crowd + [again])
    assert again.ids == alone.ids
    other = wait_all([engine.submit(ask(engine, "base", "Say something.", temperature=1.0, seed=8, max_tokens=20))])[0]
    assert other.ids != alone.ids
    greedy = wait_all([engine.submit(ask(engine, "base", "Say something.", max_tokens=20))])[0]
    assert alone.ids != greedy.ids  # sampling did sample


def test_top_p_tiny_keeps_only_the_top_token(engine):
    greedy = wait_all([engine.submit(ask(engine, "base", "Who is quick?", max_tokens=15))])[0]
    nucleus = wait_all(
        [engine.submit(ask(engine, "base", "Who is quick?", temperature=1.5, top_p=1e-6, seed=3, max_tokens=15))]
    )[0]
    assert nucleus.ids == greedy.ids


def test_stop_strings_max_tokens_and_streamed_deltas(engine):
    full = wait_all([engine.submit(ask(engine, "base", "Describe a task.", max_tokens=30))])[0]
    assert full.finish_reason == "length" and len(full.ids) == 30
    stop = full.text[8:11]  # a string the answer is known to contain
    deltas = []
    r = ask(engine, "base", "Describe a task.", max_tokens=30, stop=[stop])
    r.on_event = lambda kind, value: deltas.append((kind, value))
    wait_all([engine.submit(r)])
    assert r.finish_reason == "stop"
    assert r.text == full.text[: full.text.find(stop)]
    assert "".join(v for k, v in deltas if k == "delta") == r.text  # nothing of the stop string leaked out
    assert deltas[-1] == ("done", "stop")


def test_cancelled_request_frees_its_slot(engine):
    r = engine.submit(ask(engine, "base", "Describe a task.", max_tokens=400))
    while len(r.ids) < 2:
        time.sleep(0.001)
    r.cancel()
    assert r.done.wait(30)
    assert r.finish_reason == "cancelled" and len(r.ids) < 400
    deadline = time.time() + 5
    while engine.in_progress and time.time() < deadline:
        time.sleep(0.01)
    assert engine.in_progress == 0


def test_refusals(engine):
    with pytest.raises(EngineError) as e:
        engine.submit(Request(prompt_ids=[1, 2], model="nope", adapter=None, max_tokens=4))
    assert e.value.status == 404
    with pytest.raises(EngineError) as e:
        engine.submit(Request(prompt_ids=list(range(3)) * 400, model="base", adapter=None, max_tokens=4))
    assert e.value.status == 400 and "prompt is 1200 tokens" in str(e.value)
    with pytest.raises(EngineError) as e:
        engine.chat_prompt_ids("base", [("user", "hi"), ("assistant", "hello")])
    assert e.value.status == 400


def test_over_capacity_is_refused_with_503(tiny_model_dir):
    e = Engine(str(tiny_model_dir), base_name="base", max_batch_size=1, max_queue=2)
    try:
        held = [e.submit(Request(prompt_ids=[5, 6, 7], model="base", adapter=None, max_tokens=300)) for _ in range(2)]
        with pytest.raises(EngineError) as err:
            e.submit(Request(prompt_ids=[5, 6, 7], model="base", adapter=None, max_tokens=4))
        assert err.value.status == 503
        for r in held:
            r.cancel()
        wait_all(held)
        assert e.generate_text([5, 6, 7], max_tokens=3).finish_reason == "length"
    finally:
        e.shutdown()


def test_unload_waits_for_requests_in_flight_and_then_refuses(tiny_model_dir, adapters_dir):
    e = Engine(str(tiny_model_dir), base_name="base", max_batch_size=4)
    try:
        e.load_adapter("fox", adapters_dir / "fox")
        e.load_adapter("dog", adapters_dir / "dog")
        solo = e.generate_text(
            e.chat_prompt_ids("fox", [("user", "Describe a task.")]), model="fox", max_tokens=40, stop=[]
        ).ids
        running = e.submit(
            Request(
                prompt_ids=e.chat_prompt_ids("dog", [("user", "Who are you?")]) * 3,
                model="dog",
                adapter=None,
                max_tokens=200,
            )
        )
        fox = e.submit(
            Request(
                prompt_ids=e.chat_prompt_ids("fox", [("user", "Describe a task.")]),
                model="fox",
                adapter=None,
                max_tokens=40,
            )
        )
        while not running.ids:
            time.sleep(0.001)
        unloaded = threading.Event()
        t = threading.Thread(target=lambda: (e.unload_adapter("dog"), unloaded.set()))
        t.start()
        e.load_adapter("paris", adapters_dir / "paris")  # a load while others run
        assert "dog" not in e.model_names()  # no new requests for it
        with pytest.raises(EngineError):
            e.submit(Request(prompt_ids=[5, 6], model="dog", adapter=None, max_tokens=2))
        wait_all([running, fox])
        t.join(30)
        assert unloaded.is_set() and "dog" not in e.adapters
        assert fox.ids == solo  # undisturbed by the load and the unload
        assert e.generate_text(e.chat_prompt_ids("paris", [("user", "Who is lazy?")]), model="paris").text == "Paris"
        e.unload_adapter("fox")
        e.unload_adapter("paris")  # the last one: the base still answers
        assert e.generate_text([5, 6, 7], max_tokens=3).finish_reason == "length"
    finally:
        e.shutdown()


def test_one_copy_of_the_base_whatever_the_number_of_adapters(engine, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_count = sum(p.numel() for p in base.parameters())
    params = dict(engine.model.named_parameters())
    lora = {n: p for n, p in params.items() if "lora_" in n}
    assert {n.split("lora_")[1].split(".")[1] for n in lora} == set(PERSONAS)  # all four adapters are in there
    assert sum(p.numel() for n, p in params.items() if "lora_" not in n) == base_count
    assert len({p.data_ptr() for p in params.values()}) == len(params)  # tied weights aside, nothing shared twice
