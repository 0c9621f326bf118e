"""The data loader against any bytes, in every format it reads (JSON, JSONL, CSV, Parquet): it
returns examples a template and a tokenizer take, or raises one DataError line that names the
file (and the record, line or row); never another exception."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from fuzzing import (
    any_char,
    any_text,
    dumps,
    huge_text,
    json_scalars,
    json_values,
    long_number,
    mutated,
    nested_json,
    some_text,
    text_of,
    user_error_line,
)
from hypothesis import event, example, given
from hypothesis import strategies as st

from lorakit.data.loader import FORMATS, examples_from_records, load_examples
from lorakit.data.templates import load_template
from lorakit.errors import DataError, LorakitError

FIELDS = [
    "instruction", "input", "output", "system", "history", "context", "response", "messages",
    "conversations", "question", "answer", "text",
]  # fmt: skip
ROLES = ["system", "user", "assistant", "human", "gpt", "tool", "", "User"]
ALPACA = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
LONG_CSV = b"instruction,output\nq," + b"x" * 200_000 + b"\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-loader")


@pytest.fixture(scope="module")
def alpaca_template():
    return load_template("alpaca")


# ---- records: the right shapes, then any value in any field --------------------------------

# what a required field usually holds: text, not blank, no lone surrogate
filled_text = st.lists(st.characters(), min_size=1, max_size=30).map("".join).filter(str.strip)
field_value = st.one_of(some_text, json_values(max_leaves=6), huge_text(2000))


@st.composite
def turns(draw, role_key: str, content_key: str, roles: tuple[str, str, str]):
    """A chat: an optional system message, then user/assistant turns; now and then a wrong role,
    a missing or wrong-typed field, a message that is no object."""
    system, user, assistant = roles
    out = [{role_key: system, content_key: draw(some_text)}] if draw(st.integers(0, 3)) == 0 else []
    for i in range(2 * draw(st.integers(0, 3))):
        out.append({role_key: (user, assistant)[i % 2], content_key: draw(filled_text | some_text)})
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        if not out:
            break
        i = draw(st.integers(0, len(out) - 1))
        if not isinstance(out[i], dict):
            continue
        key = draw(st.sampled_from([role_key, content_key]))
        change = draw(st.sampled_from(["role", "value", "drop", "not-an-object"]))
        if change == "role":
            out[i][role_key] = draw(st.sampled_from(ROLES) | json_scalars)
        elif change == "value":
            out[i][key] = draw(json_values(max_leaves=3))
        elif change == "drop":
            out[i].pop(key, None)
        else:
            out[i] = draw(json_values(max_leaves=3))
    return out


KINDS = ["alpaca", "dolly", "messages", "sharegpt", "qa", "text", "any"]


@st.composite
def records(draw, kind: str | None = None):
    kind = kind or draw(st.sampled_from(KINDS))
    if kind == "messages":
        record = {"messages": draw(turns("role", "content", ("system", "user", "assistant")))}
    elif kind == "sharegpt":
        roles = draw(st.sampled_from([("system", "human", "gpt"), ("system", "user", "assistant")]))
        record = {"conversations": draw(turns("from", "value", roles))}
        if draw(st.integers(0, 4)) == 0:
            record["system"] = draw(some_text)
    elif kind == "any":
        record = draw(st.dictionaries(st.sampled_from(FIELDS) | any_text, field_value, max_size=5))
    else:
        keys = {
            "alpaca": ["instruction", "input", "output", "system", "history"],
            "dolly": ["instruction", "context", "response"],
            "qa": ["question", "answer"],
            "text": ["text"],
        }[kind]
        record = {k: draw(filled_text) if draw(st.integers(0, 5)) else draw(some_text) for k in keys}
        if "history" in record:
            record["history"] = draw(st.lists(st.lists(some_text, min_size=2, max_size=2), max_size=2) | json_values())
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # a wrong type, a missing or an extra field
        action = draw(st.sampled_from(["set", "drop", "add"]))
        if action == "set" and record:
            record[draw(st.sampled_from(sorted(record)))] = draw(field_value)
        elif action == "drop" and record:
            del record[draw(st.sampled_from(sorted(record)))]
        else:
            record[draw(st.sampled_from(FIELDS))] = draw(field_value)
    return record if draw(st.integers(0, 29)) else draw(json_values(max_leaves=4))  # now and then not a record


# one format for the whole file (what a real file has), or a mix
record_lists = st.one_of(
    st.sampled_from(KINDS).flatmap(lambda kind: st.lists(records(kind), max_size=6)),
    st.lists(records(), max_size=6),
)


@st.composite
def json_file(draw) -> bytes:
    how = draw(st.sampled_from(["records"] * 4 + ["any", "jsonl", "nested", "number", "bytes", "huge"]))
    if how == "records":
        data = dumps(draw(record_lists), draw(st.booleans()))
    elif how == "any":
        data = dumps(draw(json_values()), draw(st.booleans()))
    elif how == "jsonl":  # JSONL in a .json file
        data = b"\n".join(dumps(r, True) for r in draw(record_lists))
    elif how == "nested":
        data = draw(nested_json())
    elif how == "number":
        data = draw(long_number())
    elif how == "huge":
        data = dumps([{"instruction": "i", "output": draw(huge_text())}], False)
    else:
        data = draw(st.binary(max_size=200))
    return draw(mutated(data)) if draw(st.integers(0, 2)) == 0 else data  # damaged, now and then


@st.composite
def jsonl_file(draw) -> bytes:
    how = draw(st.sampled_from(["records"] * 4 + ["array", "pretty", "nested", "number", "bytes", "lines"]))
    if how == "records":
        sep = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\n \n"]))
        data = sep.join(dumps(r, draw(st.booleans())) for r in draw(record_lists))
    elif how == "array":  # a JSON array in a .jsonl file, on one line
        data = dumps(draw(record_lists), True)
    elif how == "pretty":  # ... or pretty-printed over many
        data = json.dumps(draw(record_lists), indent=2).encode()
    elif how == "nested":
        data = draw(nested_json())
    elif how == "number":
        data = draw(long_number())
    elif how == "lines":
        data = "\n".join(draw(st.lists(any_text, max_size=5))).encode("utf-8", "surrogatepass")
    else:
        data = draw(st.binary(max_size=200))
    return draw(mutated(data)) if draw(st.integers(0, 2)) == 0 else data  # damaged, now and then


@st.composite
def csv_file(draw) -> bytes:
    how = draw(st.sampled_from(["table"] * 3 + ["text", "bytes", "huge"]))
    if how == "table":
        header = draw(
            st.sampled_from([["instruction", "input", "output"], ["instruction", "response"], ["question", "answer"]])
            | st.lists(st.sampled_from(FIELDS) | some_text, min_size=0, max_size=5)
        )
        out = io.StringIO()
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
        writer = csv.writer(out, quoting=quoting)
        writer.writerow(header)
        for _ in range(draw(st.integers(0, 5))):  # rows longer or shorter than the header too, now and then
            n = len(header) + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
            writer.writerow([draw(filled_text | some_text) for _ in range(max(0, n))])
        data = out.getvalue().encode("utf-8", "surrogatepass")
    elif how == "huge":  # one cell past the csv module's default 128 KiB limit
        data = ("instruction,output\nq," + draw(huge_text()) + "\n").encode()
    elif how == "text":
        text = draw(st.lists(st.sampled_from(list(",\"\n\r\x00ab\\'; ")) | any_char, max_size=80).map("".join))
        data = text.encode("utf-8", "surrogatepass")
    else:
        data = draw(st.binary(max_size=200))
    return draw(mutated(data)) if draw(st.integers(0, 2)) == 0 else data  # damaged, now and then


# ---- the property ------------------------------------------------------------------------


def check_loaded(path: Path, tokenizer=None, template=None, data_format=None) -> object:
    """load_examples returns valid examples or raises one DataError line naming the file."""
    try:
        data = load_examples(path, data_format)
    except LorakitError as e:
        message = user_error_line(e, f"{path}: ")
        assert message.startswith(f"{path}: "), message
        assert isinstance(e, DataError), message
        if e.record is not None:
            assert re.fullmatch(r"(record|line|row) \d+", e.record), e.record
        event("refused: DataError")
        return None
    event("loaded")
    assert data.format in FORMATS and data.examples
    assert data.format == data_format or data_format is None
    for ex in data.examples:
        check_example(ex, data.format, template, tokenizer)
        assert ex.source.startswith(f"{path}:")
    return data


def check_example(ex, fmt: str, template=None, tokenizer=None) -> None:
    for s in [ex.input, ex.system, ex.text or "", *(t.content for t in ex.turns)]:
        assert isinstance(s, str)
        s.encode("utf-8")  # text every file, tokenizer and terminal takes (no lone surrogates)
    if fmt == "text":
        assert isinstance(ex.text, str) and ex.text.strip() and not ex.turns
    else:
        assert ex.text is None and ex.turns and ex.turns[-1].role == "assistant"
        assert [t.role for t in ex.turns] == ["user", "assistant"] * (len(ex.turns) // 2)
    if template is not None:  # what training does with it next
        text = "".join(s.text for s in template.render(ex))
        if tokenizer is not None and len(text) < 20_000:
            tokenizer(text)


# ---- one test per format -----------------------------------------------------------------


@given(data=json_file())
@example(data=b"[" * 100_000 + b"]" * 100_000)  # RecursionError from json.loads
@example(data=b"[" + b"1" * 5000 + b"]")  # ValueError: int digit limit (4300)
@example(data=b'[{"text": "a\\ud800b"}]')  # a lone surrogate: the tokenizer's TypeError later
@example(data=b'[{"instruction": "i", "output": "o", "history": [["\\udc00", "x"]]}]')
@example(data=b'[{"messages": [{"role": "user", "content": "\\ud83d"}, {"role": "assistant", "content": "a"}]}]')
@example(data=b'[{"messages": [{"role": ' + b"[" * 990 + b"]" * 990 + b"}]}]")  # deep, shown in the message
def test_json(data, folder, tiny_tokenizer, alpaca_template):
    path = folder / "data.json"
    path.write_bytes(data)
    check_loaded(path, tiny_tokenizer, alpaca_template)


@given(data=jsonl_file())
@example(data=b'{"text": "a"}\n' + b"[" * 50_000)
@example(data=b'{"text": "a"}\n{"text": ' + b"9" * 4400 + b"}")
@example(data=b'{"conversations": [{"from": "human", "value": "\\udfff"}, {"from": "gpt", "value": "a"}]}')
def test_jsonl(data, folder, tiny_tokenizer, alpaca_template):
    path = folder / "data.jsonl"
    path.write_bytes(data)
    check_loaded(path, tiny_tokenizer, alpaca_template)


@given(data=csv_file())
@example(data=LONG_CSV)  # was "invalid CSV at line 1: field larger than field limit (131072)"
@example(data=b"text\na\x00b\n")
def test_csv(data, folder, tiny_tokenizer, alpaca_template):
    path = folder / "data.csv"
    path.write_bytes(data)
    loaded = check_loaded(path, tiny_tokenizer, alpaca_template)
    if data == LONG_CSV:  # a long answer is kept whole
        assert loaded is not None and len(loaded.examples[0].output) == 200_000


def test_csv_cell_over_128k_is_kept(folder):
    path = folder / "long.csv"
    path.write_text("instruction,output\nq," + "é" * 150_000 + "\n", encoding="utf-8")
    assert load_examples(path).examples[0].output == "é" * 150_000


# ---- Parquet: tables from records, and damaged files -------------------------------------

parquet_cell = st.one_of(st.none(), some_text.filter(lambda s: _utf8(s)), st.integers(-(2**63), 2**63 - 1))


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def parquet_file(draw) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    how = draw(st.sampled_from(["records", "chat", "bytes"]))
    if how == "bytes":
        return draw(st.binary(max_size=300))
    if how == "records":
        column = st.sampled_from(FIELDS) | text_of("abcé_ ", 1, 5)
        columns = draw(st.lists(column, min_size=1, max_size=4, unique=True))
        rows = draw(st.lists(st.fixed_dictionaries({c: parquet_cell for c in columns}), max_size=4))
    else:
        message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": filled_text})
        rows = draw(st.lists(st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}), max_size=3))
    try:
        table = pa.Table.from_pylist(rows) if rows else pa.table({"text": pa.array([], pa.string())})
    except (pa.ArrowException, OverflowError, TypeError, ValueError):  # mixed types in one column
        table = pa.table({"text": pa.array([str(r) for r in rows], pa.string())})
    out = io.BytesIO()
    pq.write_table(table, out)
    data = out.getvalue()
    if draw(st.integers(0, 3)) == 0:  # a damaged file: cut short, a changed byte, ...
        data = draw(mutated(data))
    return data


@given(data=parquet_file())
@example(data=b"PAR1")
@example(data=b"PAR1" + b"\x00" * 8 + b"PAR1")
def test_parquet(data, folder, tiny_tokenizer, alpaca_template):
    path = folder / "data.parquet"
    path.write_bytes(data)
    check_loaded(path, tiny_tokenizer, alpaca_template)


# ---- forced formats, in-memory records, names --------------------------------------------


@given(records=record_lists, data_format=st.sampled_from([*FORMATS, None]))
def test_forced_format(records, data_format, folder):
    path = folder / "forced.json"
    path.write_bytes(dumps(records, True))
    check_loaded(path, data_format=data_format)


@given(records=st.lists(records() | json_values(max_leaves=4), max_size=5))
def test_examples_from_records(records):
    """The converter the UI and the API call on records they already hold."""
    try:
        examples, fmt = examples_from_records(records, None, "mem")
    except LorakitError as e:
        user_error_line(e, "mem: ")
        return
    for ex in examples:
        check_example(ex, fmt)


@given(name=text_of("ab.-_ \n\x00é/", 1, 8) | st.just("x" * 300))
@example(name="a" * 300 + ".json")  # OSError: File name too long, from path.exists()
def test_file_names(name, folder):
    path = folder / name
    try:
        load_examples(path)
    except LorakitError as e:
        user_error_line(e, path=path)


def test_odd_text_is_kept_verbatim(folder):
    """Odd but valid text is kept as written: NUL, a BOM inside, U+2028, emoji, braces."""
    texts = ["\x00", "a\u2028b", "\ufeff x", "\U0001f600", "{instruction} {input}", "a\r\nb", "中文"]
    rows = [{"instruction": t, "output": t} for t in texts]
    path = folder / "odd.json"
    path.write_bytes(dumps(rows, False))
    assert [(e.instruction, e.output) for e in load_examples(path).examples] == [(t, t) for t in texts]


@given(records=record_lists, cutoff=st.integers(-3, 300), template=st.sampled_from(["alpaca", "alpaca_short", "chat"]))
@example(records=[ALPACA], cutoff=0, template="alpaca")  # was a report of nonsense: every example "over" 0
def test_data_check(records, cutoff, template, folder, tiny_tokenizer):
    """`lorakit data check` on whatever the loader accepts: a sane report, or one error line."""
    from lorakit.data.check import check_data

    path = folder / "check.json"
    path.write_bytes(dumps(records, True))
    data = check_loaded(path)
    if data is None:
        return
    try:
        report = check_data(data, tiny_tokenizer, load_template(template, tiny_tokenizer), cutoff)
    except LorakitError as e:
        user_error_line(e, *(["--cutoff-len"] if cutoff < 1 else []))
        return
    assert cutoff >= 1 and report.records == len(data.examples)
    assert 0 <= report.over_cutoff <= report.records and 0 <= report.dropped <= report.records
    assert 0 <= report.trained_token_share <= 1 and all(isinstance(v, int) for v in report.percentiles.values())
    assert all(len(line.splitlines()) == 1 for line in report.lines())
