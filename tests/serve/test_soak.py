"""The soak under churn (bench/serve_soak.py), short: a few hundred requests from 16 clients over
the tiny model's base and 4 adapters while a fifth is loaded and unloaded every 1.5 s and every 25 requests, with
cancellations, streaming and not. The long run (3,000 requests on smollm2-135m, figures in
docs/serving.md) is the same script with its defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve_soak.py"


def test_short_soak_no_unexpected_error_no_leak_greedy_answers_unchanged(tiny_model_dir, tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(BENCH), "--base", str(tiny_model_dir), "--requests", "200", "--clients", "16"]
    cmd += ["--max-tokens", "4", "--churn-seconds", "1.5", "--churn-requests", "25"]
    cmd += ["--greedy-prompts", "2", "--rss-every", "20"]
    cmd += ["--warmup", "0.2", "--max-seconds", "400", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-4000:]
    figures = json.loads(out.read_text())
    print(figures)
    assert proc.returncode == 0 and figures["ok"], (figures, proc.stderr[-4000:])
    assert figures["requests"] == 200 and figures["server_alive"]
    assert figures["unexpected_errors"] == 0 and figures["greedy_mismatches"] == 0
    assert figures["greedy_checked"] > 0 and figures["solo_changed_after"] == 0
    assert figures["churn_cycles"] >= 1, "the churn adapter was never unloaded: no churn was tested"
    assert sum(figures["cancelled"].values()) > 0, "no request was cancelled: no disconnect was tested"
    assert figures["rss_growth_pct"] < 5.0
