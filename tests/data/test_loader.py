import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from lorakit.data.loader import FORMATS, LoadedData, detect_format, examples_from_records, load_examples
from lorakit.data.records import Turn
from lorakit.errors import ConfigError, DataError

SHARED = Path(__file__).parents[2].parent / "shared" / "datasets"

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
MESSAGES = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def fails(path, *parts, data_format=None):
    """Loading ``path`` raises a one-line DataError whose message holds every part."""
    with pytest.raises(DataError) as info:
        load_examples(path, data_format)
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    return message


# ---- each format converts -------------------------------------------------------------


def test_alpaca(write):
    data = load_examples(write("a.json", [ALPACA, {"instruction": "Say hi.", "input": None, "output": "hi"}]))
    assert isinstance(data, LoadedData) and data.format == "alpaca" and len(data.examples) == 2
    first, second = data.examples
    assert first.turns == [Turn("user", "Add the numbers."), Turn("assistant", "5")]
    assert first.input == "2 and 3" and first.system == "" and first.text is None
    assert first.source == f"{data.path}:record 0" and second.source.endswith(":record 1")
    assert second.input == ""  # null input -> ""


def test_alpaca_with_system_and_history_folds_input_into_instruction(write):
    record = {
        "instruction": "And now?",
        "input": "x=2",
        "output": "4",
        "system": "Be brief.",
        "history": [["What is x+x for x=1?", "2"]],
    }
    [ex] = load_examples(write("a.json", [record])).examples
    assert ex.system == "Be brief." and ex.input == ""
    assert [t.role for t in ex.turns] == ["user", "assistant", "user", "assistant"]
    assert ex.turns[0].content == "What is x+x for x=1?" and ex.turns[2].content == "And now?\n\nx=2"
    assert ex.instruction == "What is x+x for x=1?" and ex.output == "4"


def test_dolly_context_becomes_input(write):
    record = {"instruction": "Who?", "context": "Ada wrote it.", "response": "Ada", "category": "qa"}
    data = load_examples(write("d.jsonl", [record, {"instruction": "Hi", "response": "Hello"}]))
    assert data.format == "dolly"
    assert data.examples[0].input == "Ada wrote it." and data.examples[0].output == "Ada"
    assert data.examples[1].input == "" and data.examples[1].source.endswith(":line 2")


def test_messages_with_system(write):
    record = {
        "messages": [
            {"role": "system", "content": "Be kind."},
            *MESSAGES["messages"],
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"},
        ]
    }
    data = load_examples(write("m.json", [record]))
    [ex] = data.examples
    assert data.format == "messages" and ex.system == "Be kind."
    assert ex.turns == [Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "bye"), Turn("assistant", "ciao")]


def test_sharegpt_with_system(write):
    with_field = {"system": "S1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    with_message = {
        "conversations": [
            {"from": "system", "value": "S2"},
            {"from": "user", "value": "q"},
            {"from": "assistant", "value": "a"},
        ]
    }
    data = load_examples(write("s.json", [with_field, with_message]))
    assert data.format == "sharegpt"
    assert [ex.system for ex in data.examples] == ["S1", "S2"]
    assert all(ex.turns == [Turn("user", "q"), Turn("assistant", "a")] for ex in data.examples)


def test_text(write):
    data = load_examples(write("t.jsonl", "\n".join(json.dumps({"text": t}) for t in ["one", "two\nlines"]) + "\n\n"))
    assert data.format == "text" and [ex.text for ex in data.examples] == ["one", "two\nlines"]
    assert data.examples[0].turns == []


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": [], "instruction": "i", "output": "o"}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "i", "output": "o", "text": "t"}, "alpaca"),
        ({"instruction": "i", "response": "r"}, "dolly"),
        ({"text": "t"}, "text"),
        ({"question": "q", "answer": "a"}, "qa"),
        ({"prompt": "q", "completion": "a"}, None),
        ({"instruction": "i"}, None),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_forced_format_and_sha256_and_bom(write):
    path = write("a.json", b"\xef\xbb\xbf" + json.dumps([{"text": "t", "instruction": "i", "output": "o"}]).encode())
    data = load_examples(path, "text")
    assert data.format == "text" and data.examples[0].text == "t"
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(FORMATS) == {"alpaca", "dolly", "messages", "sharegpt", "qa", "text"}


def test_examples_from_records_default_locators():
    examples, fmt = examples_from_records([ALPACA], None, "mem")
    assert fmt == "alpaca" and examples[0].source == "mem:record 0"
    with pytest.raises(DataError, match="mem: record 0: missing field 'text'"):
        examples_from_records([ALPACA], "text", "mem")


# ---- CSV and Parquet ------------------------------------------------------------------


def test_csv_round_trip_keeps_cells_as_text(tmp_path):
    rows = [
        {"instruction": "Zähle:\n1, 2", "input": "", "output": "001"},
        {"instruction": "NA", "input": "说明", "output": "null"},
    ]
    path = tmp_path / "a.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    data = load_examples(path)
    assert data.format == "alpaca"
    assert [(ex.instruction, ex.input, ex.output) for ex in data.examples] == [
        ("Zähle:\n1, 2", "", "001"),
        ("NA", "说明", "null"),
    ]
    assert data.examples[1].source.endswith(":row 2")


def test_csv_errors(write):
    fails(write("a.csv", "instruction,output\nhi,there\nonly-one-cell\n"), "row 2:", "header's 2 columns")
    fails(write("b.csv", "instruction,output\nhi,\n  ,x\n"), "row 2: field 'instruction' is empty")
    fails(write("c.csv", "instruction,output\n"), "no records")


def test_parquet_round_trip(tmp_path, write):
    alpaca = tmp_path / "a.parquet"
    pd.DataFrame([ALPACA, {"instruction": "b", "input": None, "output": "c"}]).to_parquet(alpaca)
    data = load_examples(alpaca)
    assert data.format == "alpaca" and data.examples[0].input == "2 and 3" and data.examples[1].input == ""
    assert data.examples[1].source.endswith(":row 2")

    chat = tmp_path / "m.parquet"
    pd.DataFrame([MESSAGES, MESSAGES]).to_parquet(chat)
    data = load_examples(chat)
    assert data.format == "messages" and data.examples[1].turns == [Turn("user", "hi"), Turn("assistant", "hello")]

    bad = tmp_path / "n.parquet"
    pd.DataFrame([ALPACA, {"instruction": "b", "input": "", "output": None}]).to_parquet(bad)
    fails(bad, "row 2: field 'output' must be a string, got null")
    fails(write("broken.parquet", b"not parquet at all"), "not a readable Parquet file")


# ---- bad data -------------------------------------------------------------------------

BAD = [
    # (file name, content, data_format, parts of the message)
    (
        "a.json",
        '[{"instruction": "x", "output": "y"}\n  {"instruction": "z"}]',
        None,
        ["invalid JSON at line 2 column 3: Expecting ',' delimiter"],
    ),
    (
        "a.json",
        '{"instruction": "x", "output": "y"}\n{"instruction": "z", "output": "w"}\n',
        None,
        ["invalid JSON at line 2 column 1: Extra data", "name the file .jsonl"],
    ),
    ("a.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n', None, ["line 4: invalid JSON: "]),
    (
        "a.json",
        [ALPACA, {"instruction": "x", "input": ""}],
        None,
        ["record 1: missing field 'output' (alpaca format needs instruction, output; input"],
    ),
    (
        "a.json",
        [ALPACA] * 7 + [{"instruction": "x", "output": 42}],
        None,
        ["record 7: field 'output' must be a string, got int"],
    ),
    (
        "a.json",
        [{"instruction": None, "output": "y"}],
        None,
        ["record 0: field 'instruction' must be a string, got null"],
    ),
    (
        "a.json",
        [{"instruction": "x", "input": ["a"], "output": "y"}],
        None,
        ["field 'input' must be a string, got list"],
    ),
    ("a.json", [{"instruction": "  ", "output": "y"}], None, ["record 0: field 'instruction' is empty"]),
    ("a.json", [{"text": ""}], None, ["field 'text' is empty"]),
    (
        "a.json",
        [{"instruction": "x", "output": "y", "history": [["only one"]]}],
        None,
        ["history[0] must be a [user, assistant] pair of strings"],
    ),
    ("a.json", [], None, ["no records"]),
    ("a.json", "", None, ["no records"]),
    ("a.jsonl", "\n  \n\n", None, ["no records"]),
    ("a.json", b'[{"text": "caf\xe9"}]', None, ["not valid UTF-8 (byte 0xe9 at offset 14); save the file as UTF-8"]),
    (
        "a.json",
        {"train": [ALPACA], "b": 1},
        None,
        ["expected a JSON list of records, found an object (with keys 'train', 'b')"],
    ),
    ("a.json", '"just a string"', None, ["expected a JSON list of records, found str"]),
    ("a.json", [ALPACA, "not a record"], None, ["record 1: expected an object with fields, found str"]),
    ("a.jsonl", '{"text": "a"}\n[1, 2]\n', None, ["line 2: expected an object with fields, found list"]),
    ("a.txt", "instruction,output", None, ["unsupported file kind '.txt'", ".jsonl", ".parquet"]),
    ("a.json", [MESSAGES], "alpaca", ["record 0: missing field 'instruction' (alpaca format needs"]),
    (
        "a.json",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}],
        None,
        ["record 0: messages[1]: expected an assistant turn, got user; turns must alternate"],
    ),
    ("a.json", [{"messages": [{"role": "assistant", "content": "a"}]}], None, ["messages[0]: expected a user turn"]),
    (
        "a.json",
        [MESSAGES] * 3 + [{"messages": MESSAGES["messages"] + [{"role": "user", "content": "?"}]}],
        None,
        ["record 3: messages must end with an assistant turn"],
    ),
    ("a.json", [{"messages": [{"role": "system", "content": "s"}]}], None, ["messages has no user/assistant turns"]),
    (
        "a.json",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]}],
        None,
        ["messages[1]: a system message is allowed only as the first message"],
    ),
    (
        "a.json",
        [{"messages": [{"role": "tool", "content": "a"}]}],
        None,
        ["messages[0]: unknown role 'tool' in 'role'"],
    ),
    (
        "a.json",
        [{"messages": [{"role": "user", "content": None}]}],
        None,
        ["messages[0]: 'content' must be a string, got null"],
    ),
    ("a.json", [{"messages": "hi"}], None, ["field 'messages' must be a list, got str"]),
    (
        "a.json",
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "x"}]}],
        None,
        ["record 0: conversations[1]: unknown role 'observation' in 'from'; use system, human, user, gpt, assistant"],
    ),
    (
        "a.json",
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}],
        None,
        ["conversations[1]: 'value' must be a string, got nothing (field missing)"],
    ),
    (
        "a.json",
        [{"prompt": "q", "completion": "a"}],
        None,
        ["record 0: cannot tell the data format", "keys 'prompt', 'completion'", "alpaca (instruction, output"],
    ),
]


@pytest.mark.parametrize("name, content, data_format, parts", BAD)
def test_bad_data(write, name, content, data_format, parts):
    path = write(name, content)
    message = fails(path, *parts, data_format=data_format)
    assert message.startswith(f"{path}: ")


def test_long_values_are_truncated_in_messages(write):
    path = write("a.json", [{"messages": [{"role": "x" * 500 + "\n", "content": "c"}]}])
    assert len(fails(path, "unknown role 'xxx")) < len(str(path)) + 200


def test_windows_line_endings(write):
    data = load_examples(write("a.jsonl", b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n'))
    assert [ex.text for ex in data.examples] == ["a", "b"] and data.examples[1].source.endswith(":line 3")
    data = load_examples(write("a.csv", b'instruction,output\r\n"two\r\nlines",o\r\n'))
    assert data.examples[0].instruction == "two\r\nlines" and data.examples[0].output == "o"


def test_missing_file_and_directory(tmp_path):
    fails(tmp_path / "nope.json", "nope.json: file not found")
    fails(tmp_path, "is a directory")


def test_bad_data_format(write):
    with pytest.raises(ConfigError, match="data_format 'alpacca' is not known; use one of alpaca, dolly, messages"):
        load_examples(write("a.json", [ALPACA]), "alpacca")


# ---- the real shared data -------------------------------------------------------------


def shared(name):
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"shared dataset {path} not found (it lives outside the repository, in ../shared/datasets)")
    return path


def test_real_alpaca_en_demo():
    data = load_examples(shared("alpaca_en_demo.json"))
    assert data.format == "alpaca" and len(data.examples) == 999
    assert sum(1 for ex in data.examples if ex.input) == 412
    assert all(len(ex.turns) == 2 and ex.output for ex in data.examples)
    assert max(len(ex.output) for ex in data.examples) > 2000  # long outputs are kept whole


def test_real_alpaca_zh_demo_keeps_chinese_verbatim():
    path = shared("alpaca_zh_demo.json")
    data = load_examples(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert len(data.examples) == 1000 and sum(1 for ex in data.examples if ex.input) == 139
    assert [(ex.instruction, ex.output) for ex in data.examples] == [(r["instruction"], r["output"]) for r in raw]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in data.examples[0].instruction)


def test_real_identity():
    data = load_examples(shared("identity.json"))
    assert len(data.examples) == 91 and data.format == "alpaca"
    assert any("{{name}}" in ex.output for ex in data.examples)


def test_real_gsm8k_loads_as_question_answer():
    data = load_examples(shared("gsm8k_test.jsonl"))
    assert data.format == "qa" and len(data.examples) == 1319
    assert all(ex.output.rsplit("####", 1)[1].strip() for ex in data.examples)
    fails(shared("gsm8k_test.jsonl"), "line 1: missing field 'text'", data_format="text")


def test_unknown_keys_name_the_formats(write):
    path = write("odd.jsonl", '{"prompt": "a", "completion": "b"}\n')
    message = fails(
        path, "line 1: cannot tell the data format", "keys 'prompt', 'completion'", *[f"{f} (" for f in FORMATS]
    )
    assert "rename the fields" in message
