"""A test helper: kill -9 a lorakit command in the middle of its work (tests/ is on sys.path)."""

import os
import signal
import subprocess
import time


def kill_when(cmd: list[str], staging_glob: str, parent, ready, cwd) -> None:
    """Start ``cmd``, wait until a staging folder matching ``staging_glob`` in ``parent`` satisfies
    ``ready``, then kill -9 the process mid-export."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(ready(p) for p in parent.glob(staging_glob)):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the export ended before it was killed: {proc.stderr.read()!r}"
