"""``lorakit model pull`` / ``list`` through typer, offline (fake GGUF loading)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lorakit.errors import ModelError
from lorakit.models.commands import app

runner = CliRunner()


def test_list_empty(home):
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert "no models cached under" in result.stdout and home.name in result.stdout


def test_pull_prints_folder_last_then_list_shows_it(home, fake_gguf, fake_gguf_loader):
    result = runner.invoke(app, ["pull", str(fake_gguf)])
    assert result.exit_code == 0, result.output
    folder = result.stdout.strip().splitlines()[-1]
    assert folder.startswith(str(home / "models" / "gguf-Tiny-Model.Q4_0-"))
    assert result.stdout.strip() == folder  # progress went to stderr
    assert "converting" in result.stderr

    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0
    assert "gguf-Tiny-Model" in listed.stdout and "MiB" in listed.stdout


def test_pull_error_propagates(home):
    result = runner.invoke(app, ["pull", "nosuchmodel"])
    assert isinstance(result.exception, ModelError)  # the main CLI turns it into one line + exit code


def test_no_args_shows_help():
    result = runner.invoke(app, [])
    assert "pull" in result.output and "list" in result.output


@pytest.mark.slow
def test_pull_and_list_real_model(smollm2_path, use_shared_home):
    result = runner.invoke(app, ["pull", "smollm2-135m"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == str(smollm2_path)
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and "smollm2-135m" in listed.stdout and "pypi:" in listed.stdout
