"""The one template policy and the template's stops, seen from every path that prompts a model:
`lorakit generate` (Generator), the API (serve's Engine) and the UI (ModelSession)."""

import json

import pytest
import yaml
from random_adapter import make_random_adapter

from lorakit.data.records import Turn
from lorakit.data.templates import TEMPLATE_POLICY, load_template, resolve_template
from lorakit.infer.generate import GenerationParams, Generator
from lorakit.infer.stops import StopFilter, cut_at_stop, held_back
from lorakit.runfolder import CHECKPOINT_MARKER, CONFIG_RECORD
from lorakit.serve.engine import Engine
from lorakit.ui.inference import ModelSession, Speaker

GREEDY = GenerationParams(max_new_tokens=24)
HISTORY = [Turn("user", "Hi"), Turn("assistant", "Hello.")]
SYSTEM = "You are terse."


# ---- the policy ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    recorded = make_random_adapter(tiny_model_dir, root / "recorded", seed=1)
    load_template("alpaca_short").save(recorded)
    plain = make_random_adapter(tiny_model_dir, root / "plain", seed=2)  # plain peft: records nothing
    run = root / "run"
    ckpt = make_random_adapter(tiny_model_dir, run / "checkpoint-4", seed=3)
    (ckpt / CHECKPOINT_MARKER).write_text("{}")
    (run / CONFIG_RECORD).write_text(yaml.safe_dump({"prompt_template_name": "alpaca_legacy"}))
    merged = root / "merged"
    merged.mkdir()
    load_template("alpaca_short").save(merged)
    return {"recorded": recorded, "plain": plain, "checkpoint": ckpt, "merged": merged}


def test_policy_rules(folders, tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    # 1. an explicit name wins over everything
    assert resolve_template(name="alpaca_legacy", adapter=folders["recorded"], tokenizer=tok).name == "alpaca_legacy"
    # 2. an adapter uses what it was trained with; a checkpoint its run's; plain peft -> alpaca
    assert (
        resolve_template(adapter=folders["recorded"], model_path=tiny_model_dir, tokenizer=tok).name == "alpaca_short"
    )
    assert resolve_template(adapter=folders["checkpoint"], tokenizer=tok).name == "alpaca_legacy"
    assert resolve_template(adapter=folders["plain"], model_path=tiny_model_dir, tokenizer=tok).name == "alpaca"
    #    a merged folder keeps its adapter's template
    assert resolve_template(model_path=folders["merged"], tokenizer=tok).name == "alpaca_short"
    # 3. a base alone: its own chat template when it has one, else alpaca
    assert resolve_template(model_path=tiny_model_dir, tokenizer=tok).kind == "chat"

    class NoChat:
        chat_template = None

    assert resolve_template(model_path=tiny_model_dir, tokenizer=NoChat()).name == "alpaca"
    assert "explicitly" in TEMPLATE_POLICY and "comparison" in TEMPLATE_POLICY


def test_config_help_states_the_policy():
    from typer.testing import CliRunner

    from lorakit.cli import app

    out = CliRunner().invoke(app, ["config-help"]).output
    assert "template" in out and "its own chat template" in out and "turn markers" in out


# ---- one prompt, one answer, whichever path -----------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir, folders):
    e = Engine(str(tiny_model_dir), base_name="base", max_batch_size=4)
    e.load_adapter("recorded", folders["recorded"])
    e.load_adapter("plain", folders["plain"])
    yield e
    e.shutdown()


def _messages(question):
    return [("system", SYSTEM)] + [(t.role, t.content) for t in HISTORY] + [("user", question)]


@pytest.mark.parametrize("which", [None, "recorded", "plain"])
def test_cli_api_and_ui_build_the_same_token_ids_and_answers(which, engine, folders, tiny_model_dir):
    adapter = folders[which] if which else None
    question = "What is the capital of France?"
    gen = Generator(base=str(tiny_model_dir), adapter=str(adapter) if adapter else None)
    session = ModelSession()
    speaker = Speaker(base=str(tiny_model_dir), adapter_key=which, adapter_folder=adapter)
    session.prepare(speaker)
    template = session.template_for(speaker)
    assert template.name == gen.template.name == engine.template_for(which or "base").name
    assert template.name == ("chat" if which is None else "alpaca_short" if which == "recorded" else "alpaca")

    cli_ids = gen.prompt_ids(question, history=HISTORY, system=SYSTEM)
    api_ids = engine.chat_prompt_ids(which or "base", _messages(question))
    ui_ids = session._prompt(template, question, HISTORY, SYSTEM)[0].tolist()
    assert cli_ids == api_ids == ui_ids

    cli = gen.generate(question, history=HISTORY, system=SYSTEM, params=GREEDY)
    api = engine.generate_text(api_ids, model=which or "base", max_tokens=GREEDY.max_new_tokens).text.strip()
    ui = session.answer(speaker, question, HISTORY, SYSTEM, params=GREEDY)
    assert cli == api == ui


def test_compare_prompts_the_base_with_the_adapters_template(folders, tiny_model_dir):
    gen = Generator(base=str(tiny_model_dir), adapter=str(folders["recorded"]))
    base_only = Generator(base=str(tiny_model_dir), template="alpaca_short")
    # --compare: the base answers the adapter's prompt (alpaca_short), not its own chat template
    assert gen.generate("Who are you?", params=GREEDY, use_adapter=False) == base_only.generate(
        "Who are you?", params=GREEDY
    )


# ---- stops ----------------------------------------------------------------------------------------


def test_stop_filter_never_hands_out_part_of_a_marker():
    text = "Stay active.\n\n### Instruction:\nMore"
    for size in range(1, 8):
        f = StopFilter(["### Instruction:", "### Response:"])
        out = "".join(f.feed(text[i : i + size]) for i in range(0, len(text), size))
        assert out == "Stay active.\n\n" and f.stopped
    f = StopFilter(["### Response:"])
    assert f.feed("a ##") == "a " and f.feed("", end=True) == "##"  # not a marker after all: handed out at the end
    assert cut_at_stop("x<|im_end|>y", ["<|im_end|>"]) == ("x", True)
    assert held_back("abc ###", ["### Response:"]) == 3 and held_back("abc", ["### Response:"]) == 0


def test_templates_declare_their_turn_markers(tiny_tokenizer, tmp_path):
    assert load_template("alpaca").stops().strings == ("### Instruction:", "### Input:", "### Response:")
    chat = load_template("chat", tiny_tokenizer).stops(tiny_tokenizer)
    assert chat.strings == ("<|im_end|>",) and chat.token_ids == (tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    own = tmp_path / "qa.json"
    own.write_text(
        json.dumps(
            {
                "prompt_input": "Q: {instruction}\n{input}\nA: ",
                "prompt_no_input": "Q: {instruction}\nA: ",
                "response_split": "A:",
            }
        )
    )
    assert load_template(str(own)).stops().strings == ("Q:", "A:")
    own.write_text(
        json.dumps(
            {
                "prompt_input": "Q: {instruction}\n{input}\nA: ",
                "prompt_no_input": "Q: {instruction}\nA: ",
                "response_split": "A:",
                "stop": ["<END>"],
            }
        )
    )
    assert load_template(str(own)).stops().strings == ("<END>",)


def test_every_path_stops_at_the_templates_marker(tiny_model_dir, tmp_path):
    """A marker taken from the middle of the model's own unstopped answer: generate, the API and
    the UI (streamed too) all end the answer right before it, and no stream shows part of it."""
    question = "Who are you?"
    base_tpl = json.loads(load_template("alpaca_short").to_json())
    free = tmp_path / "free.json"
    free.write_text(json.dumps({**base_tpl, "stop": []}))  # no markers: the model runs to max tokens
    params = GenerationParams(max_new_tokens=40)
    unstopped = Generator(base=str(tiny_model_dir), template=str(free)).generate(question, params=params)
    words = unstopped.split()
    assert len(words) >= 6, unstopped
    marker = next(w for w in words[3:] if len(w) >= 2 and unstopped.find(w) >= len(" ".join(words[:3])))
    expected = unstopped[: unstopped.find(marker)].strip()
    assert expected and len(expected) < len(unstopped) - len(marker)
    folder = tmp_path / "adapter"
    make_random_adapter(tiny_model_dir, folder, std=0.0)  # B = 0: answers exactly as the base
    (folder / "lorakit_template.json").write_text(json.dumps({**base_tpl, "name": "marked", "stop": [marker]}))

    gen = Generator(base=str(tiny_model_dir), adapter=str(folder))
    assert gen.stops.strings == (marker,)
    assert gen.generate(question, params=params) == expected
    assert gen.generate_batch([question, question], params=params) == [expected, expected]

    e = Engine(str(tiny_model_dir), base_name="base")
    try:
        e.load_adapter("marked", folder)
        deltas = []
        from lorakit.serve.engine import Request

        r = e.submit(
            Request(
                prompt_ids=e.chat_prompt_ids("marked", [("user", question)]),
                model="marked",
                adapter=None,
                max_tokens=40,
                on_event=lambda kind, x: deltas.append(x) if kind == "delta" else None,
            )
        )
        r.done.wait(60)
        assert r.text.strip() == expected and r.finish_reason == "stop"
        assert marker not in "".join(deltas) and "".join(deltas).strip() == expected
    finally:
        e.shutdown()

    session = ModelSession()
    speaker = Speaker(base=str(tiny_model_dir), adapter_key="marked", adapter_folder=folder)
    assert session.answer(speaker, question, params=params) == expected
    pieces = list(session.stream(speaker, question, params=params))
    assert pieces[-1].strip() == expected
    assert not any(marker[:2] in p[len(expected) :] for p in pieces)


def test_the_docs_state_the_rule_the_code_follows():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "templates.md").read_text(encoding="utf-8")
    assert TEMPLATE_POLICY in doc
