"""Command-line numbers and paths, through lorakit's own entry point in process (lorakit.cli.main
with sys.argv set, as the console script runs it): a value out of range is one "error:" line
(exit 2) naming the option, before any model loads; no traceback; no output written.

tests/test_cli_values.py runs a few of these through a subprocess; here hypothesis picks them."""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from pathlib import Path

import pytest
from fuzzing import text_of
from hypothesis import example, given
from hypothesis import strategies as st
from random_adapter import make_random_adapter

from lorakit import cli

NO_ADAPTER = "/nonexistent/lorakit-fuzz/adapter"


def run(*args) -> tuple[int, str]:
    """(exit code, stderr) of `lorakit ARGS` run in this process."""
    err, out = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["lorakit", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    text = err.getvalue()
    assert "Traceback" not in text + out.getvalue(), text
    return code, text


def one_error_line(code: int, stderr: str, *needles: str) -> str:
    assert code == 2, (code, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Offline, an empty model cache: nothing here may find or pull a model."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(tmp_path_factory.mktemp("home")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setenv("COLUMNS", "200")
        yield


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("cli-values") / "lora")


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---- numbers ---------------------------------------------------------------------------------

out_of_range_ports = st.integers(max_value=0) | st.integers(min_value=65536) | st.sampled_from([2**64, -(2**63)])


@given(port=out_of_range_ports, command=st.sampled_from([["serve"], ["serve", "--engine", "vllm"], ["ui"]]))
@example(port=0, command=["serve"])
@example(port=65536, command=["ui"])
def test_port_out_of_range(port, command, env, tmp_path_factory):
    where = ["--workdir", str(tmp_path_factory.getbasetemp() / "ui-never-made")] if command == ["ui"] else []
    code, err = run(*command, *where, f"--port={port}")
    one_error_line(code, err, f"--port {port}: must be between 1 and 65535")
    assert not (tmp_path_factory.getbasetemp() / "ui-never-made").exists()


def _not_an_int(text: str) -> bool:
    """What `lorakit serve --port` itself refuses. Its own parameter decides (typer coerces through
    pydantic): besides what int() takes (" 6", "+6", "6_0") it takes integral decimals ("990.0" is
    port 990), and each of those would start a server that this in-process test then waits on for
    ever (found by the long run)."""
    import click
    import typer.main

    command = typer.main.get_command(cli.app).commands["serve"]
    port = next(p for p in command.params if p.name == "port")
    try:
        port.process_value(click.Context(command), text)
    except Exception:  # typer's own BadParameter (its vendored click's)
        return True
    return False


@given(port=text_of("0123456789-+.e x_", 0, 8).filter(_not_an_int))
@example(port="99e1")
@example(port="990.5")
def test_port_not_a_number(port, env):
    """click's usage error: exit 2, its own box naming the option, no traceback."""
    code, err = run("serve", f"--port={port}")
    assert code == 2 and "--port" in err, (code, err)


def test_the_port_filter_is_clicks():
    """What int() refuses but click takes is not "not a number" (it would start a server)."""
    assert not _not_an_int("990.0") and not _not_an_int(" 7") and _not_an_int("99e1") and _not_an_int("")


floats = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1.0, 1e-320, float("nan"), float("inf"), -1.0]))
ints = st.one_of(st.integers(-(2**40), 2**40), st.sampled_from([0, 1, -1, 2**63]))


def _generation_ok(temperature, top_p, top_k, num_beams, max_new_tokens, penalty) -> bool:
    """The documented domain (lorakit generate --help, cli._params); NaN is out of every range."""
    return (
        temperature >= 0
        and 0 < top_p <= 1
        and top_k >= 0
        and num_beams >= 1
        and max_new_tokens >= 1
        and 0 < penalty < float("inf")
    )


@given(t=floats, p=floats, k=ints, beams=ints, new=ints, penalty=floats, command=st.sampled_from(["generate", "chat"]))
@example(t=-1.0, p=1.0, k=50, beams=1, new=8, penalty=1.0, command="generate")
@example(t=0.0, p=0.0, k=50, beams=1, new=8, penalty=1.0, command="chat")
@example(t=0.0, p=float("nan"), k=50, beams=1, new=8, penalty=1.0, command="generate")
@example(t=float("nan"), p=1.0, k=50, beams=1, new=8, penalty=1.0, command="generate")
@example(t=0.0, p=1.0, k=50, beams=1, new=8, penalty=0.0, command="generate")
def test_generation_numbers(t, p, k, beams, new, penalty, command, env):
    """Out of range: the generation line. In range: the next check (the adapter), so nothing loads."""
    args = [f"--temperature={t!r}", f"--top-p={p!r}", f"--max-new-tokens={new}", "--adapter", NO_ADAPTER]
    if command == "generate":
        args = ["q", f"--top-k={k}", f"--num-beams={beams}", f"--repetition-penalty={penalty!r}", *args]
    else:
        k, beams, penalty = 50, 1, 1.0
    code, err = run(command, *args)
    if _generation_ok(t, p, k, beams, new, penalty):
        one_error_line(code, err, f"adapter: {NO_ADAPTER} is not a folder")
    else:
        one_error_line(code, err, "generation: need temperature >= 0, 0 < top-p <= 1")


@given(batch=ints, new=ints, limit=st.none() | ints)
@example(batch=0, new=8, limit=None)  # was a ValueError traceback (range() step 0) after the model loaded
@example(batch=8, new=0, limit=None)
@example(batch=8, new=8, limit=-1)
def test_eval_numbers(batch, new, limit, env, tmp_path_factory):
    """Out of range: one line naming the flag, before any model loads; in range: the base's line."""
    data = tmp_path_factory.getbasetemp() / "eval-data.json"
    data.write_text('[{"instruction": "hi", "output": "there"}]')
    out = tmp_path_factory.getbasetemp() / "eval-never-made"
    numbers = {"--batch-size": batch, "--max-new-tokens": new, "--limit": limit}
    given_ = [f"{flag}={v}" for flag, v in numbers.items() if v is not None]
    code, err = run("eval", "--data", data, "--out", out, "--base", NO_ADAPTER, *given_)
    bad = [flag for flag, v in numbers.items() if v is not None and v < 1]
    one_error_line(code, err, bad[0] if bad else NO_ADAPTER)
    assert not out.exists()


# found by this fuzzing: was a ValueError traceback from transformers after the model loaded
@pytest.mark.parametrize("penalty", ["0", "-1", "nan"])
def test_repetition_penalty_out_of_range(penalty, env):
    code, err = run("generate", "q", f"--repetition-penalty={penalty}", "--adapter", NO_ADAPTER)
    one_error_line(code, err, "repetition")


@pytest.mark.parametrize("cutoff", ["0", "-5"])
def test_data_check_cutoff_len_out_of_range(cutoff, env, tiny_model_dir, tmp_path):
    """Was a report of nonsense (every example over the cutoff, none trained), exit 0."""
    data = tmp_path / "d.json"
    data.write_text('[{"instruction": "hi", "output": "there"}]')
    code, err = run("data", "check", data, "--base", tiny_model_dir, f"--cutoff-len={cutoff}")
    one_error_line(code, err, "--cutoff-len")


@given(n=st.integers(max_value=0))
@example(n=0)
def test_export_verify_prompts_out_of_range(n, adapter, env, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "export-never-made"
    code, err = run("export", "--adapter", adapter, "--out", root / "out", f"--verify-prompts={n}")
    one_error_line(code, err, f"--verify-prompts: {n}; must be at least 1")
    assert not root.exists() or not listing(root)


# ---- paths -----------------------------------------------------------------------------------

segment = st.one_of(
    text_of("ab é.-_ 中\t'\"$*?[]{}", 1, 10),
    st.sampled_from(["..", ".", "file", "x" * 256, "dev", "-rf", "--force"]),
)


@st.composite
def out_paths(draw, root: Path) -> str:
    start = draw(st.sampled_from(["root", "root", "root", "/proc", "/dev/null", "/sys", "relative"]))
    parts = draw(st.lists(segment, min_size=1, max_size=4))
    base = {"root": str(root), "relative": "rel", "/proc": "/proc", "/dev/null": "/dev/null", "/sys": "/sys"}[start]
    return os.path.join(base, *parts)


@given(data=st.data(), command=st.sampled_from(["merge", "export", "quantize"]))
@example(data=None, command="merge")
def test_out_folders(data, command, env, tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.getbasetemp() / "out-root"
    root.mkdir(exist_ok=True)
    (root / "file").write_text("a file where a folder is asked for")
    before = listing(root)
    out = data.draw(out_paths(root)) if data is not None else str(root / "file" / "x")
    args = {
        "merge": ["merge", "--adapter", NO_ADAPTER, "--out", out],
        "export": ["export", "--adapter", NO_ADAPTER, "--out", out],
        "quantize": ["adapter", "quantize", NO_ADAPTER, "--out", out],
    }[command]
    code, err = run(*args)
    line = one_error_line(code, err)
    assert "--out" in line or "adapter" in line or "File name too long" in line, line
    assert listing(root) == before, "an output was left behind"
    assert not Path(root.parent / "rel").exists() or not listing(root.parent / "rel")


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    """Relative --out paths land in a scratch working directory."""
    cwd = tmp_path_factory.getbasetemp() / "out-cwd"
    cwd.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        yield


# found by this fuzzing: Path.expanduser() raised RuntimeError (a traceback)
def test_out_folder_of_unknown_user(env):
    code, err = run("merge", "--adapter", NO_ADAPTER, "--out", "~lorakit-no-such-user/out")
    one_error_line(code, err, "--out")


def test_numbers_print_as_given():
    """repr() of the floats above is what click parses back (nan, inf, 1e-320)."""
    for value in (float("nan"), float("inf"), 1e-320, -0.0):
        parsed = float(repr(value))
        assert parsed == value or (math.isnan(parsed) and math.isnan(value))


# found by this fuzzing: was a ValueError traceback (range() step 0) after the base model loaded
def test_eval_batch_size_zero(env, tiny_model_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text('[{"instruction": "hi", "output": "there"}]')
    code, err = run("eval", "--data", data, "--out", tmp_path / "r", "--base", tiny_model_dir, "--batch-size=0")
    one_error_line(code, err, "--batch-size")
