"""What the fuzz tests share: the one property every reader has, and the strategies for the
bytes of a user's file (any bytes, nesting, huge strings, NUL bytes, BOMs, lone surrogates,
invalid UTF-8, truncation)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st

from lorakit.errors import LorakitError


def user_error_line(error: BaseException, *needles: str, path: Path | str | None = None) -> str:
    """``error`` is a LorakitError whose message is one line holding every needle. A ``path``
    the user named may itself hold a line break (the CLI prints it joined to one line)."""
    assert isinstance(error, LorakitError), f"{type(error).__name__}: {error}"
    message = str(error)
    shown = message.replace(str(path), "PATH") if path is not None else message
    assert message and len(shown.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def default_run_share(share: float):
    """Fewer examples in the default run for a test that needs the model; the long run
    (LORAKIT_FUZZ_EXAMPLES) gives every test its full count."""
    if os.environ.get("LORAKIT_FUZZ_EXAMPLES"):
        return lambda test: test
    return settings(max_examples=max(10, int(settings().max_examples * share)))


def fresh_dir(path: Path) -> Path:
    """An empty folder at ``path`` (hypothesis reruns a test body in one pytest test)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---- values -------------------------------------------------------------------------------

# every code point, lone surrogates included (st.text() leaves them out). Every text strategy here
# draws from this one alphabet, or builds its text from a list of characters: hypothesis 6.155's
# shrinker crashes (ValueError in IntervalSet.index) on a one_of of texts of different alphabets.
any_char = st.characters(exclude_categories=())
any_text = st.text(any_char, max_size=40)


def text_of(chars: str, min_size: int = 0, max_size: int = 10):
    """Text made of the given characters only."""
    return st.lists(st.sampled_from(list(chars)), min_size=min_size, max_size=max_size).map("".join)


# text a reader must take as it is: control characters, NUL, line separators, RTL marks, emoji
odd_text = st.sampled_from(
    ["", " ", "\x00", "\ufeff", "\u2028", "\r\n", "\t", "é", "中文", "\U0001f600", "{instruction}", "{input}"]
)
some_text = st.one_of(any_text, odd_text, st.text(any_char, max_size=10))
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    some_text,
)


def json_values(scalars=json_scalars, max_leaves: int = 12):
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(some_text, inner, max_size=4),
        max_leaves=max_leaves,
    )


def dumps(value, ensure_ascii: bool) -> bytes:
    """JSON bytes; lone surrogates go out as \\udxxx escapes, or (ensure_ascii=False) as the
    invalid UTF-8 bytes a careless writer produces."""
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


# ---- file bytes -----------------------------------------------------------------------------


@st.composite
def nested_json(draw, max_depth: int = 30_000) -> bytes:
    """Lists or objects nested up to far past Python's recursion limit, closed or not."""
    depth = draw(st.integers(min_value=1, max_value=max_depth))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"text":', "}]")]))
    middle = draw(st.sampled_from(["1", '"x"', "[]", ""]))
    closed = draw(st.booleans())
    return (opener * depth + middle + (closer * depth if closed else "")).encode()


@st.composite
def long_number(draw) -> bytes:
    """A JSON number around Python's int digit limit (4300), alone or inside a record."""
    digits = "1" * draw(st.integers(min_value=4000, max_value=6000))
    frac = draw(st.sampled_from(["", ".5", "e5"]))
    wrap = draw(st.sampled_from(["{}", "[{}]", '[{{"text": "t", "n": {}}}]', '{{"text": {}}}']))
    return wrap.format(digits + frac).encode()


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` after a few of the damages a real file suffers."""
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        op = draw(st.sampled_from(["bom", "truncate", "nul", "bad_utf8", "flip", "crlf", "twice", "insert", "cut"]))
        n = len(data)
        at = draw(st.integers(min_value=0, max_value=n))
        if op == "bom":
            data = b"\xef\xbb\xbf" + data
        elif op == "truncate":
            data = data[:at]
        elif op == "nul":
            data = data[:at] + b"\x00" + data[at:]
        elif op == "bad_utf8":
            bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe9", b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
            data = data[:at] + bad + data[at:]
        elif op == "flip" and n:
            i = min(at, n - 1)
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
        elif op == "crlf":
            data = data.replace(b"\n", b"\r\n")
        elif op == "twice":
            data = data + data
        elif op == "insert":
            data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
        elif op == "cut" and n:
            end = draw(st.integers(min_value=at, max_value=n))
            data = data[:at] + data[end:]
    return data


def huge_text(max_size: int = 300_000):
    """One long string (past the csv module's 128 KiB cell limit at the top)."""
    char = st.sampled_from(["x", "é", "中", "\U0001f600", " ", "\x00"])
    return st.builds(lambda c, n: c * n, char, st.integers(0, max_size))
