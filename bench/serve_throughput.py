"""Serving throughput: 8 concurrent clients vs one client at a time, against a live `lorakit serve`.

Starts `lorakit serve` as a user would (a subprocess on a free port), then sends the same
requests (alpaca_en_demo instructions from ../shared/datasets, greedy, max_tokens fixed) twice:
one after another from a single client (sequential), then from N concurrent clients, in
alternating rounds (so a change in the machine's load hits both). Each phase's throughput is
generated tokens / wall seconds (usage.completion_tokens from the responses); the figure is the
median round's ratio concurrent / sequential (the overall ratio is printed too). It also checks that every greedy
answer from the concurrent phase is identical to the same request's sequential answer.

With --adapters K (default 2), K LoRA adapters (random, rank 8 on all linear layers, so their
cost is real) are written to a temp adapters-dir and loaded at run time through POST
/v1/adapters; requests cycle over the base and the adapters, so batches mix adapters.

    python bench/serve_throughput.py                 # smollm2-135m, 32 requests, 8 clients
    python bench/serve_throughput.py --clients 8 --requests 48 --max-tokens 64 --adapters 0

Prints one JSON line with the figures last.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "alpaca_en_demo.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(base: str, folder: Path, k: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model

    from lorakit.models.loading import load_model, resolve_model_path

    names = []
    for i in range(k):
        model = load_model(resolve_model_path(base))
        torch.manual_seed(100 + i)
        cfg = LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        )
        peft_model = get_peft_model(model, cfg)
        with torch.no_grad():  # small random updates: answers stay fluent but differ from the base
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.02)
        name = f"bench{i}"
        peft_model.save_pretrained(folder / name)
        names.append(name)
    return names


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"lorakit serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("lorakit serve did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=2, help="random adapters loaded at run time (0 = base only)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="alternations of sequential and concurrent phases")
    args = ap.parse_args()

    import openai

    records = json.loads(DATA.read_text(encoding="utf-8"))
    prompts = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in records][: args.requests]
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-bench-serve-"))
    adapter_names = make_adapters(args.base, tmp, args.adapters) if args.adapters else []
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit.cli",
            "serve",
            "--base",
            args.base,
            "--port",
            str(port),
            "--adapters-dir",
            str(tmp),
            "--max-batch-size",
            str(args.max_batch_size),
        ],
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    try:
        wait_ready(url, proc)
        import httpx

        for name in adapter_names:
            r = httpx.post(url + "/v1/adapters", json={"name": name, "path": name}, timeout=120)
            r.raise_for_status()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        models = [args.base] + adapter_names
        jobs = [(i, models[i % len(models)], p) for i, p in enumerate(prompts)]

        def ask(job):
            i, model, prompt = job
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens, temperature=0
            )
            return i, r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

        ask(jobs[0])  # warm-up
        # Rounds of (one client, then N clients) over the same requests, so a change in the
        # machine's load during the run hits both phases alike; the ratio is the median round's.
        per_round = max(args.clients, len(jobs) // args.rounds)
        sequential, concurrent, rounds = [], [], []
        for start in range(0, len(jobs), per_round):
            chunk = jobs[start : start + per_round]
            t = time.perf_counter()
            seq = [ask(j) for j in chunk]
            seq_s = time.perf_counter() - t
            t = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                conc = list(pool.map(ask, chunk))
            conc_s = time.perf_counter() - t
            sequential += seq
            concurrent += conc
            rounds.append(
                {
                    "sequential_s": seq_s,
                    "concurrent_s": conc_s,
                    "sequential_tokens": sum(x[2] for x in seq),
                    "concurrent_tokens": sum(x[2] for x in conc),
                }
            )
            r = rounds[-1]
            print(
                f"round {len(rounds)}: {len(chunk)} requests, sequential {r['sequential_tokens'] / seq_s:.1f} tok/s, "
                f"{args.clients} clients {r['concurrent_tokens'] / conc_s:.1f} tok/s",
                file=sys.stderr,
            )
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(30)

    seq_tokens = sum(r["sequential_tokens"] for r in rounds)
    conc_tokens = sum(r["concurrent_tokens"] for r in rounds)
    seq_s = sum(r["sequential_s"] for r in rounds)
    conc_s = sum(r["concurrent_s"] for r in rounds)
    ratios = sorted(
        (r["concurrent_tokens"] / r["concurrent_s"]) / (r["sequential_tokens"] / r["sequential_s"]) for r in rounds
    )
    same = sum(a[1] == b[1] for a, b in zip(sequential, concurrent))
    batch_sum = batch_count = 0.0
    for line in metrics.splitlines():
        if line.startswith("lorakit_batch_size_sum"):
            batch_sum = float(line.split()[-1])
        elif line.startswith("lorakit_batch_size_count"):
            batch_count = float(line.split()[-1])
    result = {
        "base": args.base,
        "adapters": len(adapter_names),
        "requests": len(jobs),
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "sequential_tokens_per_s": round(seq_tokens / seq_s, 1),
        "concurrent_tokens_per_s": round(conc_tokens / conc_s, 1),
        "ratio": round(statistics.median(ratios), 2),
        "ratio_overall": round((conc_tokens / conc_s) / (seq_tokens / seq_s), 2),
        "ratio_per_round": [round(x, 2) for x in ratios],
        "sequential_s": round(seq_s, 1),
        "concurrent_s": round(conc_s, 1),
        "tokens_sequential": seq_tokens,
        "tokens_concurrent": conc_tokens,
        "identical_greedy_answers": f"{same}/{len(jobs)}",
        "finished_by_length": sum(x[3] == "length" for x in concurrent),
        "mean_batch_size_over_run": round(batch_sum / batch_count, 2) if batch_count else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
