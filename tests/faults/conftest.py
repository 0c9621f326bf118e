"""Fixtures for the fault tests: a small file system of a chosen size (a tmpfs, mounted here and
unmounted at teardown; skipped where this process may not mount), filled to leave a chosen number of
bytes free; a random adapter; the `lorakit` command run in this process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fault_helpers import SmallDisk
from random_adapter import make_random_adapter


def _mounted_disk(tmp_path, size: str):
    """A tmpfs of ``size`` mounted at tmp_path/disk (needs root or CAP_SYS_ADMIN), unmounted after."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield SmallDisk(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs for this test."""
    yield from _mounted_disk(tmp_path, "4m")


@pytest.fixture
def disk_24m(tmp_path):
    """A 24 MiB tmpfs, for outputs such as a GGUF export that do not fit in 4 MiB."""
    yield from _mounted_disk(tmp_path, "24m")


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
