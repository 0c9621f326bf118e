"""Prompt template files (docs/templates.md) and the template record an adapter folder keeps
(lorakit_template.json) against any bytes: a PromptTemplate that prompts, or one ConfigError line
naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fuzzing import (
    any_char,
    dumps,
    fresh_dir,
    json_values,
    long_number,
    mutated,
    nested_json,
    some_text,
    text_of,
    user_error_line,
)
from hypothesis import example, given
from hypothesis import strategies as st

from lorakit.data.records import Example, Turn
from lorakit.data.templates import PromptTemplate, load_template, resolve_template, template_for_folder
from lorakit.errors import ConfigError, LorakitError
from lorakit.runfolder import CHECKPOINT_PREFIX, CONFIG_RECORD

KEYS = ["prompt_input", "prompt_no_input", "response_split", "stop", "name", "description", "kind", "chat_template"]
GOOD = {
    "description": "Q and A.",
    "prompt_input": "Q: {instruction}\n{input}\nA: ",
    "prompt_no_input": "Q: {instruction}\nA: ",
    "response_split": "A:",
    "stop": ["\nQ:"],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-templates")


template_text = st.one_of(
    some_text,
    st.builds(lambda a, b: f"{a}{{instruction}}{b}", some_text, some_text),
    st.builds(lambda a, b, c: f"{a}{{instruction}}{b}{{input}}{c}", some_text, some_text, some_text),
)


@st.composite
def template_file(draw) -> bytes:
    how = draw(st.sampled_from(["good", "good", "record", "any", "nested", "number", "bytes"]))
    if how in ("good", "record"):
        record = dict(GOOD)
        if how == "record":
            record = {k: draw(template_text) for k in ("prompt_input", "prompt_no_input", "response_split")}
            if draw(st.booleans()):
                record["stop"] = draw(st.lists(some_text, max_size=3))
        for _ in range(draw(st.integers(0, 3))):  # a key of another type, missing, or another kind
            key = draw(st.sampled_from(KEYS))
            action = draw(st.sampled_from(["set", "drop", "chat"]))
            if action == "set":
                record[key] = draw(json_values(max_leaves=4) | template_text)
            elif action == "drop":
                record.pop(key, None)
            else:
                record.update(kind="chat", chat_template=draw(st.none() | some_text | json_values(max_leaves=2)))
        data = dumps(record, draw(st.booleans()))
    elif how == "any":
        data = dumps(draw(json_values()), draw(st.booleans()))
    elif how == "nested":
        data = draw(nested_json())
    elif how == "number":
        data = draw(long_number())
    else:
        data = draw(st.binary(max_size=100))
    return draw(mutated(data)) if draw(st.integers(0, 3)) == 0 else data


def check_template(template: PromptTemplate) -> None:
    """Types right, and it prompts (alpaca: no tokenizer needed) and stops."""
    assert isinstance(template.name, str) and isinstance(template.description, str)
    assert template.kind in ("alpaca", "chat")
    assert template.stop is None or all(isinstance(s, str) and s for s in template.stop)
    stops = template.stops()
    assert all(isinstance(s, str) and s for s in stops.strings)
    template.to_json()
    if template.kind == "chat":
        assert template.chat_template is None or isinstance(template.chat_template, str)
        return
    for key in ("prompt_input", "prompt_no_input", "response_split"):
        assert isinstance(getattr(template, key), str)
    prompt = template.build_prompt("ask this", input="with that", history=[Turn("user", "a"), Turn("assistant", "b")])
    assert "ask this" in prompt
    assert "ask this" in template.build_prompt("ask this", input="with that")
    segments = template.render(Example(turns=[Turn("user", "q"), Turn("assistant", "a")], input="i", system="s"))
    assert segments[-1].trained and segments[-1].text == "a"
    template.extract_response(prompt + "the answer")


@given(data=template_file())
@example(data=b"[" * 100_000)  # RecursionError from json.loads
@example(data=b"{" + b'"a": ' * 5 + b"1" * 5000 + b"}")  # ValueError: int digit limit
@example(data=b'{"kind": "chat", "chat_template": 5, "name": [1]}')  # was accepted: name a list
@example(data=b'{"kind": "chat", "stop": "###"}')  # stop not checked for chat templates
@example(data=dumps({**GOOD, "name": 3}, True))
def test_template_file(data, folder):
    path = folder / "template.json"
    path.write_bytes(data)
    try:
        template = load_template(str(path))
    except LorakitError as e:
        user_error_line(e, f"prompt template {path}: ")
        assert isinstance(e, ConfigError)
        return
    check_template(template)


@given(data=template_file())
@example(data=b'{"name": "x", "kind": "alpaca", "description": ""}')  # KeyError: 'prompt_input'
@example(data=b'{"name": "x", "kind": "chat", "chat_template": ["{{ x }}"]}')
@example(data=b"[" * 100_000)
def test_adapter_template_record(data, folder):
    """An adapter folder's lorakit_template.json, as generate, serve and the UI read it."""
    adapter = fresh_dir(folder / "adapter")
    record = adapter / "lorakit_template.json"
    record.write_bytes(data)
    for read in (lambda: template_for_folder(adapter), lambda: resolve_template(adapter=adapter)):
        try:
            template = read()
        except LorakitError as e:
            user_error_line(e, f"prompt template {record}: ")
            continue
        assert template is not None
        check_template(template)


@given(name=json_values(max_leaves=3) | some_text | st.sampled_from(["alpaca", "chat", "", " ", "/nope.json"]))
@example(name=" ")  # found by the long run: a blank name read as a file path, no record named
@example(name=["alpaca"])  # found by the long run: a list, TypeError deep in the lookup
def test_adapter_config_record_template_name(name, folder):
    """A checkpoint without a template record falls back to its run's lorakit_config.yaml; an
    unusable prompt_template_name there is one error naming that file, never a traceback."""
    run = fresh_dir(folder / "run")
    checkpoint = run / f"{CHECKPOINT_PREFIX}4"
    checkpoint.mkdir()
    record = run / CONFIG_RECORD
    record.write_text(yaml.safe_dump({"prompt_template_name": name}), encoding="utf-8")
    try:
        template = resolve_template(adapter=checkpoint)
    except LorakitError as e:
        assert isinstance(e, ConfigError)
        user_error_line(e, f"{record}: ")
        return
    check_template(template)


@given(name=text_of("ab.-_/\x00é ", 1, 8) | st.text(any_char, min_size=1, max_size=40) | st.just("a" * 300))
@example(name="a" * 300)  # OSError: File name too long, from the built-in lookup
@example(name="\n")  # a line break in the name, shown escaped
@example(name="README.md")  # found by the long run: a file that exists is read as a template file
def test_template_names(name):
    """A name is a built-in template or a path: its error names the option, or the file it read."""
    try:
        check_template(load_template(name))
    except LorakitError as e:
        message = user_error_line(e, path=name)
        assert message.startswith(("prompt_template_name: ", f"prompt template {name}: ")), message
