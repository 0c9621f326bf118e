"""Command-line values a user gets wrong are one `error:` line (exit 2) before any model loads:
ports out of range or taken, output folders that cannot be written."""

from __future__ import annotations

import socket

import pytest
from random_adapter import make_random_adapter
from test_cli import assert_user_error, lorakit


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import os

    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "COLUMNS": "200",
        "LORAKIT_HOME": str(tmp_path_factory.mktemp("home")),
    }


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("values") / "lora")


@pytest.mark.parametrize("port", ["99999", "0", "-5"])
@pytest.mark.parametrize("command", [["serve"], ["serve", "--engine", "vllm"], ["ui"]])
def test_port_out_of_range(command, port, env, tmp_path, tiny_model_dir):
    base = ["--base", str(tiny_model_dir)] if command[0] == "serve" else ["--workdir", str(tmp_path / "w")]
    r = lorakit(*command, *base, f"--port={port}", cwd=tmp_path, env=env)
    assert_user_error(r, f"--port {port}", "between 1 and 65535")


@pytest.mark.parametrize("command", [["serve"], ["ui"]])
def test_port_taken(command, env, tmp_path, tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        base = ["--base", str(tiny_model_dir)] if command[0] == "serve" else ["--workdir", str(tmp_path / "w")]
        r = lorakit(*command, *base, "--port", port, cwd=tmp_path, env=env)
    assert_user_error(r, f"--port: cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize(
    "command, out",
    [
        (["merge"], "/proc/nope"),  # a pseudo file system
        (["export", "--to", "hf"], "/proc/nope/deeper"),
        (["export", "--to", "vllm", "--no-verify"], "/dev/null/x"),  # a file where a folder must be
    ],
)
def test_output_folder_that_cannot_be_written(command, out, adapter, env, tmp_path):
    r = lorakit(*command, "--adapter", adapter, "--out", out, cwd=tmp_path, env=env)
    assert_user_error(r, f"--out: {out}")
