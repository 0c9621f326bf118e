"""`lorakit ui` on the command line: a missing Gradio or a busy port is one line, no traceback."""

import os
import socket
import subprocess
import sys


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
