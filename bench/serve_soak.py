"""Soak under churn: thousands of requests against a live `lorakit serve` while adapters come and go.

Starts `lorakit serve` as a user would (a subprocess, 127.0.0.1 only, an API key), with K random
LoRA adapters (rank 8 on all linear layers) loaded through POST /v1/adapters and one more, "churn",
loaded and unloaded every --churn-seconds by a thread of its own (and, with --churn-requests N, also
every N finished requests, so a fast machine cannot finish before any churn happened). Then --clients threads send
--requests requests over the base and the adapters (the churn adapter too, while it may be gone):
chat and plain completions, streamed and not, greedy and sampled, and some of them cancelled on
purpose (a stream closed after its first chunks, a non-streamed request dropped by a short client
timeout). Bounded in count and in time (--max-seconds).

Before the soak, each (model, prompt) pair of the greedy set is asked alone (solo answers); every
greedy answer during the soak must equal its solo answer, and so must a last solo pass at the end.
The server's RSS is read from /proc every --rss-every requests.

Reports: requests, answers, cancellations by kind, errors by kind (expected: 404 for the churn
adapter while it is unloaded; everything else is unexpected), p50/p95/p99 latency of full answers,
RSS at start (after warm-up), middle and end with its slope per 1,000 requests, greedy answers
equal to solo. Target: zero unexpected errors, RSS growth under 5% after warm-up, every greedy
answer unchanged; the exit status is 1 when one is missed.

    python bench/serve_soak.py                                   # smollm2-135m, 3000 requests, 16 clients
    python bench/serve_soak.py --base /path/to/model --requests 300 --max-tokens 8   # a short run

Prints one JSON line with the figures last (and writes it to --out when given).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import free_port, make_adapters, wait_ready

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain what a LoRA adapter is in one sentence.",
    "Name two primary colors.",
    "How do I reverse a list in Python?",
    "Describe the moon.",
    "Translate 'good morning' into Spanish.",
]
EXPECTED_CHURN_ERRORS = {404}  # the churn adapter asked for while it is unloaded (or unloading)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, args, url: str, key: str, models: list[str], pid: int):
        self.args, self.url, self.models, self.pid = args, url, models, pid
        self.headers = {"Authorization": f"Bearer {key}"}
        self.lock = threading.Lock()
        self.done = 0
        self.next_index = 0
        self.latencies: list[float] = []
        self.outcomes: Counter = Counter()
        self.errors: Counter = Counter()
        self.unexpected: list[str] = []
        self.mismatches: list[str] = []
        self.greedy_checked = 0
        self.rss: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.churn_loaded = False
        self.churn_cycles = 0
        self.churn_lock = threading.Lock()

    # ---- one request ---------------------------------------------------------------------------
    def body(self, rng: random.Random, model: str, prompt: str, chat: bool, greedy: bool, stream: bool) -> dict:
        body: dict = {"model": model, "max_tokens": self.args.max_tokens, "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if greedy:
            body["temperature"] = 0
        else:
            body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 31))
        return body

    def ask(self, client, body: dict, chat: bool, cancel_after: int | None = None) -> tuple[str, str]:
        """(outcome, text): outcome is "answer", "cancelled" or "error:<kind>"."""
        import httpx

        path = "/v1/chat/completions" if chat else "/v1/completions"
        if not body["stream"]:
            timeout = 0.05 + 0.2 * random.random() if cancel_after is not None else 600
            try:
                r = client.post(self.url + path, json=body, headers=self.headers, timeout=timeout)
            except httpx.TimeoutException:
                if cancel_after is not None:
                    return "cancelled", ""
                return "error:timeout", ""
            if r.status_code != 200:
                return f"error:{r.status_code}", r.text[:200]
            choice = r.json()["choices"][0]
            return "answer", choice["message"]["content"] if chat else choice["text"]
        parts, chunks = [], 0
        with client.stream("POST", self.url + path, json=body, headers=self.headers, timeout=600) as r:
            if r.status_code != 200:
                r.read()
                return f"error:{r.status_code}", r.text[:200]
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return "answer", "".join(parts)
                event = json.loads(data)
                if "error" in event:
                    return "error:stream", json.dumps(event)[:200]
                chunks += 1
                if cancel_after is not None and chunks > cancel_after:
                    return "cancelled", ""  # leaving the with-block closes the connection mid-stream
                for c in event["choices"]:
                    parts.append((c.get("delta") or {}).get("content") or "" if chat else c.get("text") or "")
        return "error:stream_cut", "the stream ended without [DONE]"

    # ---- the clients ---------------------------------------------------------------------------
    def client_loop(self, seed: int, solo: dict) -> None:
        import httpx

        rng = random.Random(seed)
        deadline = self.started + self.args.max_seconds
        with httpx.Client() as client:
            while not self.stop.is_set() and time.time() < deadline:
                with self.lock:
                    if self.next_index >= self.args.requests:
                        return
                    self.next_index += 1
                use_churn = self.churn_loaded and rng.random() < 0.1
                model = "churn" if use_churn else rng.choice(self.models)
                prompt = rng.choice(PROMPTS)
                chat = rng.random() < 0.75
                greedy = rng.random() < 0.6
                stream = rng.random() < 0.5
                cancel = rng.random() < self.args.cancel_rate
                body = self.body(rng, model, prompt, chat, greedy, stream)
                t0 = time.perf_counter()
                try:
                    outcome, text = self.ask(client, body, chat, rng.randrange(0, 3) if cancel else None)
                except Exception as e:  # a connection the server dropped, a body that is not JSON
                    outcome, text = f"error:{type(e).__name__}", str(e)[:200]
                elapsed = time.perf_counter() - t0
                with self.lock:
                    self.done += 1
                    churn_due = self.args.churn_requests > 0 and self.done % self.args.churn_requests == 0
                    if outcome == "answer":
                        self.outcomes["answer"] += 1
                        self.latencies.append(elapsed)
                        key = (model, prompt, chat)
                        if greedy and key in solo:
                            self.greedy_checked += 1
                            if text.rstrip() != solo[key].rstrip():
                                self.mismatches.append(f"{key}: {text!r} != solo {solo[key]!r}")
                    elif outcome == "cancelled":
                        self.outcomes["cancelled (stream closed)" if stream else "cancelled (timeout)"] += 1
                    else:
                        kind = outcome.split(":", 1)[1]
                        self.errors[f"{kind} ({model if model == 'churn' else 'stable'})"] += 1
                        expected = model == "churn" and kind.isdigit() and int(kind) in EXPECTED_CHURN_ERRORS
                        if not expected:
                            self.unexpected.append(f"{outcome} on {model}: {text}")
                    if self.done % self.args.rss_every == 0:
                        self.rss.append((self.done, rss_mib(self.pid)))
                    if self.done % 250 == 0:
                        print(
                            f"  {self.done} requests, {time.time() - self.started:.0f} s, errors {dict(self.errors)}, "
                            f"RSS {rss_mib(self.pid):.0f} MiB",
                            file=sys.stderr,
                            flush=True,
                        )
                if churn_due:  # on a fast machine the timer alone may never fire within the run
                    self.toggle_churn(client)

    def toggle_churn(self, client) -> None:
        """Load the churn adapter if it is gone, unload it if it is there (one toggle at a time)."""
        with self.churn_lock:
            if not self.churn_loaded:
                churn = {"name": "churn", "path": "churn"}
                r = client.post(self.url + "/v1/adapters", json=churn, headers=self.headers, timeout=600)
                if r.status_code != 200:
                    self.unexpected.append(f"load churn: {r.status_code} {r.text[:200]}")
                    return
                self.churn_loaded = True
            else:
                self.churn_loaded = False  # clients stop choosing it; requests in flight finish first
                r = client.delete(self.url + "/v1/adapters/churn", headers=self.headers, timeout=600)
                if r.status_code != 200:
                    self.unexpected.append(f"unload churn: {r.status_code} {r.text[:200]}")
                    return
                self.churn_cycles += 1

    def churn_loop(self) -> None:
        import httpx

        with httpx.Client(timeout=600) as client:
            while not self.stop.wait(self.args.churn_seconds):
                self.toggle_churn(client)

    def solo_answers(self) -> dict:
        import httpx

        answers = {}
        with httpx.Client() as client:
            for model in self.models:
                for prompt in PROMPTS[: self.args.greedy_prompts]:
                    for chat in (True, False):
                        body = self.body(random.Random(0), model, prompt, chat, greedy=True, stream=False)
                        outcome, text = self.ask(client, body, chat)
                        if outcome != "answer":
                            raise SystemExit(f"solo answer for {model}: {outcome} {text}")
                        answers[model, prompt, chat] = text
        return answers

    def run(self) -> dict:
        solo = self.solo_answers()
        self.started = time.time()
        churn = threading.Thread(target=self.churn_loop, daemon=True)
        churn.start()
        clients = [
            threading.Thread(target=self.client_loop, args=(1000 + i, solo), daemon=True)
            for i in range(self.args.clients)
        ]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        self.stop.set()
        churn.join(timeout=600)
        wall = time.time() - self.started
        self.rss.append((self.done, rss_mib(self.pid)))
        solo_after = self.solo_answers()
        changed = [f"{k}: {solo[k]!r} -> {solo_after[k]!r}" for k in solo if solo_after.get(k) != solo[k]]
        return self.report(wall, len(solo), changed)

    def report(self, wall: float, solo_pairs: int, changed: list[str]) -> dict:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 3) if lat else float("nan")

        warm = max(1, int(self.args.warmup * self.done))
        after_warm = [(n, r) for n, r in self.rss if n >= warm] or self.rss
        start_rss, end_rss = after_warm[0][1], after_warm[-1][1]
        mid_rss = after_warm[len(after_warm) // 2][1]
        if len(after_warm) >= 2:
            xs, ys = [n for n, _ in after_warm], [r for _, r in after_warm]
            slope = statistics.linear_regression(xs, ys).slope * 1000 if len(set(xs)) > 1 else 0.0
        else:
            slope = 0.0
        growth = (end_rss - start_rss) / start_rss * 100
        out = {
            "requests": self.done,
            "wall_s": round(wall, 1),
            "clients": self.args.clients,
            "answers": self.outcomes["answer"],
            "cancelled": {k: v for k, v in self.outcomes.items() if k != "answer"},
            "errors": dict(self.errors),
            "unexpected_errors": len(self.unexpected),
            "churn_cycles": self.churn_cycles,
            "latency_s": {"p50": pct(50), "p95": pct(95), "p99": pct(99)},
            "rss_mib": {"start": round(start_rss, 1), "middle": round(mid_rss, 1), "end": round(end_rss, 1)},
            "rss_growth_pct": round(growth, 2),
            "rss_slope_mib_per_1000": round(slope, 2),
            "greedy_checked": self.greedy_checked,
            "greedy_mismatches": len(self.mismatches),
            "solo_pairs": solo_pairs,
            "solo_changed_after": len(changed),
        }
        out["ok"] = (
            out["unexpected_errors"] == 0
            and out["greedy_mismatches"] == 0
            and not changed
            and growth < self.args.max_rss_growth
            and self.done >= min(self.args.requests, 1)
        )
        for line in self.unexpected[:5] + self.mismatches[:5] + changed[:5]:
            print("  !", line, file=sys.stderr)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4, help="stable adapters (besides the churn one)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--churn-seconds", type=float, default=3.0, help="load or unload the churn adapter this often")
    ap.add_argument(
        "--churn-requests",
        type=int,
        default=0,
        help="also load or unload it every N finished requests (0: by time only); makes churn independent of speed",
    )
    ap.add_argument("--cancel-rate", type=float, default=0.1, help="share of requests cancelled by the client")
    ap.add_argument("--greedy-prompts", type=int, default=4, help="prompts of the greedy set checked against solo")
    ap.add_argument("--rss-every", type=int, default=50)
    ap.add_argument("--warmup", type=float, default=0.1, help="share of requests before RSS is compared")
    ap.add_argument("--max-rss-growth", type=float, default=5.0, help="percent, after warm-up")
    ap.add_argument("--max-seconds", type=float, default=3600)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import httpx

    from lorakit.models.loading import resolve_model_path

    base = str(resolve_model_path(args.base))
    key = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="lorakit-soak-") as tmp:
        adapters_dir = Path(tmp) / "adapters"
        adapters_dir.mkdir()
        names = make_adapters(base, adapters_dir, args.adapters + 1)
        (adapters_dir / names[-1]).rename(adapters_dir / "churn")
        names = names[:-1]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "serve.log", "w")  # noqa: SIM115 - the server writes to it while we run
        cmd = [sys.executable, "-m", "lorakit.cli", "serve", "--base", base, "--port", str(port)]
        cmd += ["--adapters-dir", str(adapters_dir), "--max-batch-size", str(args.max_batch_size)]
        cmd += ["--max-queue", str(max(64, 4 * args.clients))]
        env = {**os.environ, "LORAKIT_API_KEY": key, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(url, proc)
            for name in names:
                r = httpx.post(
                    url + "/v1/adapters",
                    json={"name": name, "path": name},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=600,
                )
                r.raise_for_status()
            base_name = httpx.get(url + "/health", timeout=10).json()["base"]
            soak = Soak(args, url, key, [base_name, *names], proc.pid)
            print(
                f"soak: {args.requests} requests, {args.clients} clients, base + {len(names)} adapters + churn "
                f"every {args.churn_seconds:g} s, on {base}",
                file=sys.stderr,
            )
            out = soak.run()
            out["server_alive"] = proc.poll() is None
            out["ok"] = out["ok"] and out["server_alive"]
            out["base"] = args.base
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    line = json.dumps(out)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
