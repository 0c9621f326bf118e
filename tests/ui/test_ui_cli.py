"""`lorakit ui` on the command line: a missing Gradio, a busy port, a --host others can reach without a
login or a bad login option is one line (exit 2), no traceback, before Gradio is imported."""

import os
import socket
import subprocess
import sys

import pytest


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_without_gradio_one_line_says_what_to_install(tmp_path):
    r = _run(
        "import sys; sys.modules['gradio'] = None; sys.argv = ['lorakit', 'ui']; from lorakit.cli import main; main()",
        tmp_path,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: lorakit ui needs Gradio: pip install 'lorakit[ui]'"


def test_a_busy_port_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _run(
            f"import sys; sys.argv = ['lorakit', 'ui', '--port', '{port}', '--workdir', 'wd']; "
            "from lorakit.cli import main; main()",
            tmp_path,
        )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: --port: cannot listen on 127.0.0.1:{port}")
    assert len(r.stderr.strip().splitlines()) == 1


# ---- who may open the page: refused before Gradio (or torch) is imported, one line, exit 2

REPORT_IMPORTS = (
    "import sys, atexit; "
    "atexit.register(lambda: print('imported:', sorted(m for m in ('gradio', 'torch', 'transformers') "
    "if m in sys.modules)))"
)


def _ui(args: list[str], tmp_path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            f"{REPORT_IMPORTS}; sys.argv = ['lorakit', 'ui', *{args!r}]; from lorakit.cli import main; main()",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={k: v for k, v in {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}.items() if v is not None},
    )


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "imported: []" in r.stdout, r.stdout  # nothing heavy was loaded for the refusal
    return lines[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_host_others_can_reach_without_a_login_is_refused(tmp_path, host):
    line = _one_error_line(_ui(["--host", host, "--workdir", "wd"], tmp_path, {"LORAKIT_UI_AUTH": None}))
    assert line.startswith(f"error: --host {host}: other machines can reach this address")
    assert "--auth-file PATH" in line and "--auth USER:PASS" in line
    assert not (tmp_path / "wd").exists()  # refused before anything was made


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--auth", "ann"], "error: --auth: expected USER:PASS"),
        (["--auth", "ann:"], "error: --auth: the password after 'ann:' is empty"),
        (["--auth-file", "missing.txt"], "error: --auth-file missing.txt: no such file"),
        (["--auth-file", "users.txt"], "error: --auth-file users.txt: line 2: expected USER:PASS"),
        (["--auth", "ann:pw", "--max-upload-mb", "0"], "error: --max-upload-mb 0: must be at least 1"),
    ],
)
def test_bad_login_options_are_one_line(tmp_path, args, expected):
    (tmp_path / "users.txt").write_text("ann:pw\nbob-without-password\n")
    line = _one_error_line(_ui(["--host", "0.0.0.0", *args], tmp_path, {"LORAKIT_UI_AUTH": None}))
    assert line.startswith(expected), line
    assert "pw" not in line.replace("users.txt", "")


def test_a_bad_login_from_the_environment_is_one_line(tmp_path):
    line = _one_error_line(_ui(["--host", "0.0.0.0"], tmp_path, {"LORAKIT_UI_AUTH": "ann"}))
    assert line == "error: LORAKIT_UI_AUTH: expected USER:PASS (a user name, a colon, a password)"
