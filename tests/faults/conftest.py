"""Fixtures for the fault tests: a small file system of a chosen size (a tmpfs, mounted here and
unmounted at teardown; skipped where this process may not mount), filled to leave a chosen number of
bytes free; a random adapter; the `lorakit` command run in this process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fault_helpers import SmallDisk
from random_adapter import make_random_adapter


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted at tmp_path/disk for this test (needs root or CAP_SYS_ADMIN)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield SmallDisk(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("faults") / "lora")


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `lorakit ARGS` in this process (cli.main, as the console script does): (exit code,
    stdout, stderr)."""
    from lorakit import cli

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["lorakit", *map(str, args)])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run
