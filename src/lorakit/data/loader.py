"""Read a data file (JSON, JSONL, CSV, Parquet) and convert every record into ``Example``.

The format (alpaca, dolly, messages, sharegpt, text) is detected from the first record's keys,
or given; every record is then checked against that one format. Problems raise ``DataError``
naming the file and the record:

    "record N"  0-based index in a JSON list
    "line N"    1-based line number in a JSONL file
    "row N"     1-based data row of a CSV or Parquet file (header excluded)

Text is kept verbatim (no stripping); only an input/context that is blank becomes "".
CSV is read with the stdlib ``csv`` module so every cell stays text ("001", "NA" are not
turned into numbers or nulls); Parquet with pyarrow.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lorakit.data.records import Example, Turn
from lorakit.errors import ConfigError, DataError

FORMATS = ("alpaca", "dolly", "messages", "sharegpt", "qa", "text")

# What each format needs: used in error messages.
_NEEDS = {
    "alpaca": "instruction, output; input, system, history optional",
    "dolly": "instruction, response; context optional",
    "messages": "messages: a list of {role, content}",
    "sharegpt": "conversations: a list of {from, value}; system optional",
    "qa": "question, answer (GSM8K style)",
    "text": "text",
}
_KINDS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_CSV_CELL_LIMIT = 2**31 - 1  # the largest the csv module takes on every platform
_MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class LoadedData:
    examples: list[Example]
    format: str  # detected or given
    path: Path
    sha256: str  # of the file's bytes


class _Bad(Exception):
    """A problem with one record; the caller adds the file and the record's name."""


def load_examples(path: str | Path, data_format: str | None = None) -> LoadedData:
    """Read ``path`` and convert every record; raise ``DataError`` on the first bad one."""
    path = Path(path)
    _check_format(data_format)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as e:  # a name too long for the file system, a folder that cannot be searched
        raise DataError(path, f"cannot read the file: {e.strerror or e}") from None
    if not exists:
        raise DataError(path, "file not found")
    if is_dir:
        raise DataError(path, "is a directory; give a data file")
    kind = _KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            path,
            f"unsupported file kind {path.suffix or '(no extension)'!r}; "
            "use .json, .jsonl (or .ndjson), .csv or .parquet",
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(path, f"cannot read the file: {e.strerror or e}") from None
    items = _READERS[kind](path, data)
    examples, fmt = examples_from_records([r for _, r in items], data_format, path, [loc for loc, _ in items])
    return LoadedData(examples, fmt, path, hashlib.sha256(data).hexdigest())


def detect_format(record: dict) -> str | None:
    """The format one record is in, by its keys; None when none matches."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "instruction" in record and "response" in record:
        return "dolly"
    if "question" in record and "answer" in record:
        return "qa"
    if "text" in record:
        return "text"
    return None


def examples_from_records(
    records: list, data_format: str | None = None, path: str | Path = "<records>", locators: list[str] | None = None
) -> tuple[list[Example], str]:
    """Convert records (dicts) into Examples; the format is detected from the first record
    unless given. ``locators`` name the records in errors and ``Example.source``
    (default "record N")."""
    _check_format(data_format)
    if not records:
        raise DataError(path, "no records")
    locators = locators or [f"record {i}" for i in range(len(records))]
    fmt = data_format
    examples = []
    for loc, record in zip(locators, records):
        try:
            if not isinstance(record, dict):
                raise _Bad(f"expected an object with fields, found {_type(record)}")
            if fmt is None:
                fmt = detect_format(record)
                if fmt is None:
                    raise _Bad(_undetected(record))
            example = _CONVERT[fmt](record)
        except _Bad as e:
            raise DataError(path, str(e), record=loc) from None
        example.source = f"{path}:{loc}"
        examples.append(example)
    return examples, fmt


# ---- readers: bytes -> [(locator, record)] ----------------------------------------------


def _decode(path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            path, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # accept a UTF-8 BOM


def _json_problem(error: Exception) -> str:
    """What json.loads raises besides JSONDecodeError, in words: nesting deeper than Python's
    recursion limit, a number longer than Python converts (sys.get_int_max_str_digits())."""
    if isinstance(error, RecursionError):
        return "lists or objects nested too deeply"
    if "integer string conversion" in str(error):
        return f"a number with more than {sys.get_int_max_str_digits()} digits"
    return _one_line(error)


def _read_json(path, data):
    text = _decode(path, data)
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; for one JSON object per line, name the file .jsonl" if e.msg == "Extra data" else ""
        raise DataError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}") from None
    except (RecursionError, ValueError) as e:
        raise DataError(path, f"invalid JSON: {_json_problem(e)}") from None
    if isinstance(value, dict):
        raise DataError(path, f"expected a JSON list of records, found an object (with {_keys(value)})")
    if not isinstance(value, list):
        raise DataError(path, f"expected a JSON list of records, found {_type(value)}")
    return [(f"record {i}", r) for i, r in enumerate(value)]


def _read_jsonl(path, data):
    items = []
    # split on "\n" only: str.splitlines() would also split on U+2028 etc. inside JSON strings
    for n, line in enumerate(_decode(path, data).split("\n"), 1):
        if not line.strip():
            continue
        try:
            items.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON: {e.msg} (column {e.colno})", record=f"line {n}") from None
        except (RecursionError, ValueError) as e:
            raise DataError(path, f"invalid JSON: {_json_problem(e)}", record=f"line {n}") from None
    return items


def _read_csv(path, data):
    # The stdlib reader, not datasets/pandas: those turn cells like "42", "NA" or "null" into
    # numbers or missing values, which would corrupt answers and break the string checks.
    # Its default cell limit (128 KiB) would refuse a long answer that JSON takes: lift it.
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_CELL_LIMIT))
    reader = csv.DictReader(io.StringIO(_decode(path, data), newline=""))
    items = []
    try:
        for n, row in enumerate(reader, 1):  # DictReader skips blank lines
            if None in row or None in row.values():
                raise DataError(
                    path,
                    f"the number of cells differs from the header's {len(reader.fieldnames)} columns",
                    record=f"row {n}",
                )
            items.append((f"row {n}", row))
    except csv.Error as e:
        raise DataError(path, f"invalid CSV at line {reader.line_num}: {_one_line(e)}") from None
    return items


def _read_parquet(path, data):
    # pyarrow directly (what datasets uses underneath): keeps list-of-struct chat columns as-is.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(path, f"not a readable Parquet file: {_one_line(e)}") from None
    return [(f"row {n}", r) for n, r in enumerate(rows, 1)]


_READERS = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}


# ---- converters: record -> Example (raise _Bad) ------------------------------------------


def _str(record, key, fmt, required=True, nonempty=False) -> str:
    """A string field; an optional field that is missing or null gives ""."""
    if key not in record or (record[key] is None and not required):
        if required:
            raise _Bad(f"missing field {key!r} ({fmt} format needs {_NEEDS[fmt]})")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise _Bad(f"field {key!r} must be a string, got {_type(value)}")
    if nonempty and not value.strip():
        raise _Bad(f"field {key!r} is empty")
    return _valid_text(value, f"field {key!r}")


def _valid_text(value: str, where: str) -> str:
    """``value`` if it is text a tokenizer can take: a JSON escape like "\\ud800" without its
    pair gives a lone surrogate, which no UTF-8 tokenizer, file or terminal accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Bad(
            f"{where} holds {value[e.start]!r}, half of a UTF-16 surrogate pair (a \\u escape without "
            "its other half), which is not text"
        ) from None
    return value


def _alpaca(record) -> Example:
    instruction = _str(record, "instruction", "alpaca", nonempty=True)
    inp = _str(record, "input", "alpaca", required=False)
    output = _str(record, "output", "alpaca")
    system = _str(record, "system", "alpaca", required=False)
    history = _history(record.get("history"))
    if history and inp.strip():
        # Example.input belongs to the FIRST user turn, but with history the instruction is the
        # last user turn: fold the input into the instruction (as "instruction\n\ninput").
        instruction, inp = f"{instruction}\n\n{inp}", ""
    turns = history + [Turn("user", instruction), Turn("assistant", output)]
    return Example(turns=turns, input=inp if inp.strip() else "", system=system)


def _history(value) -> list[Turn]:
    """LLaMA-Factory's ``history``: [[user, assistant], ...] turns before the instruction."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad(f"field 'history' must be a list of [user, assistant] pairs, got {_type(value)}")
    turns = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise _Bad(f"history[{i}] must be a [user, assistant] pair of strings, got {_short(pair)}")
        user, assistant = (_valid_text(s, f"history[{i}]") for s in pair)
        turns += [Turn("user", user), Turn("assistant", assistant)]
    return turns


def _dolly(record) -> Example:
    instruction = _str(record, "instruction", "dolly", nonempty=True)
    context = _str(record, "context", "dolly", required=False)
    response = _str(record, "response", "dolly")
    return Example(
        turns=[Turn("user", instruction), Turn("assistant", response)], input=context if context.strip() else ""
    )


def _qa(record) -> Example:
    question = _str(record, "question", "qa", nonempty=True)
    answer = _str(record, "answer", "qa")
    return Example(turns=[Turn("user", question), Turn("assistant", answer)])


def _messages(record) -> Example:
    return _chat(record, "messages", "role", "content", _MESSAGE_ROLES, "")


def _sharegpt(record) -> Example:
    system = _str(record, "system", "sharegpt", required=False)
    return _chat(record, "conversations", "from", "value", _SHAREGPT_ROLES, system)


def _chat(record, key, role_key, content_key, roles, system) -> Example:
    """A chat list: an optional leading system message, then user/assistant turns that
    alternate, start with user and end with assistant."""
    fmt = "messages" if key == "messages" else "sharegpt"
    if key not in record:
        raise _Bad(f"missing field {key!r} ({fmt} format needs {_NEEDS[fmt]})")
    items = record[key]
    if not isinstance(items, list):
        raise _Bad(f"field {key!r} must be a list, got {_type(items)}")
    turns = []
    for i, message in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise _Bad(f"{where} must be an object with {role_key!r} and {content_key!r}, got {_type(message)}")
        name = message.get(role_key)
        if not isinstance(name, str) or name not in roles:
            raise _Bad(f"{where}: unknown role {_short(name)} in {role_key!r}; use {', '.join(roles)}")
        content = message.get(content_key)
        if not isinstance(content, str):
            got = _type(content) if content_key in message else "nothing (field missing)"
            raise _Bad(f"{where}: {content_key!r} must be a string, got {got}")
        _valid_text(content, f"{where}: {content_key!r}")
        role = roles[name]
        if role == "system":
            if i != 0:
                raise _Bad(f"{where}: a system message is allowed only as the first message")
            if system:
                raise _Bad(f"{where}: a system message and a 'system' field; give only one")
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise _Bad(
                f"{where}: expected {'a user' if expected == 'user' else 'an assistant'} turn, "
                f"got {role}; turns must alternate user/assistant, starting with user"
            )
        turns.append(Turn(role, content))
    if not turns:
        raise _Bad(f"{key} has no user/assistant turns")
    if turns[-1].role != "assistant":
        raise _Bad(f"{key} must end with an assistant turn")
    return Example(turns=turns, system=system)


def _text(record) -> Example:
    return Example(text=_str(record, "text", "text", nonempty=True))


_CONVERT = {"alpaca": _alpaca, "dolly": _dolly, "messages": _messages, "sharegpt": _sharegpt, "qa": _qa, "text": _text}


# ---- helpers ----------------------------------------------------------------------------


def _check_format(data_format):
    if data_format is not None and data_format not in FORMATS:
        raise ConfigError(
            f"data_format {_short(data_format)} is not known; use one of "
            f"{', '.join(FORMATS)}, or leave it unset to detect it"
        )


def _undetected(record) -> str:
    known = "; ".join(f"{f} ({_NEEDS[f]})" for f in FORMATS)
    return (
        f"cannot tell the data format: the record has {_keys(record)}; "
        f"known formats: {known}; rename the fields to match one"
    )


def _keys(d: dict) -> str:
    if not d:
        return "no fields"
    shown = ", ".join(_short(k, 40) for k in list(d)[:8])
    return f"keys {shown}{', ...' if len(d) > 8 else ''}"


def _type(value) -> str:
    return {type(None): "null", dict: "object"}.get(type(value), type(value).__name__)


def _short(value, limit: int = 60) -> str:
    try:
        text = repr(value)  # repr escapes newlines: stays one line
    except RecursionError:  # lists nested almost as deeply as json.loads allows
        text = f"a {_type(value)} nested too deeply to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(error: Exception, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
