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

With --engine vllm, lorakit serve and vLLM (lorakit's vllm_deploy command, from the Python that
lorakit export --to vllm finds) serve the same base and adapters side by side in one run; the same
requests go to each at every client count of --client-counts (1,8 by default), in rounds whose
engine order alternates; each figure is the median round's tokens/s, and the ratio is vLLM /
lorakit. Greedy answers are compared between the engines (both fp32 on a CPU).

    python bench/serve_throughput.py --engine vllm --client-counts 1,8 --adapters 2
    python bench/serve_throughput.py --engine vllm --client-counts 1,8,32 --adapters 4   # on a GPU

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
    ap.add_argument(
        "--engine", choices=["lorakit", "vllm"], default="lorakit", help="vllm: both engines, side by side"
    )
    ap.add_argument("--client-counts", default="1,8", help="--engine vllm: concurrent clients per phase")
    ap.add_argument(
        "--dtype", default=None, help="--engine vllm: both engines' dtype (default fp32 on CPU, bf16 on GPU)"
    )
    ap.add_argument("--vllm-python", default=None, help="the Python that has vLLM (default: lorakit's lookup)")
    args = ap.parse_args()
    if args.engine == "vllm":
        compare_engines(args)
        return

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


def start_lorakit(args, adapters: dict[str, Path], dtype: str, port: int, template: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lorakit.cli", "serve", "--base", args.base, "--port", str(port)]
    cmd += ["--max-batch-size", str(args.max_batch_size), "--dtype", dtype]
    if template:  # the base prompted as vLLM prompts it (one chat template per vLLM server)
        cmd += ["--template", template]
    for name, folder in adapters.items():
        cmd += ["--adapter", f"{name}={folder}"]
    return subprocess.Popen(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, stderr=subprocess.DEVNULL)


def compare_engines(args) -> None:
    """lorakit serve and vLLM side by side: the same requests at each client count, in rounds of
    alternating engine order; medians of the rounds' tokens/s; vLLM / lorakit."""
    import openai
    import torch

    from lorakit.infer import vllm_deploy

    gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    counts = [int(c) for c in args.client_counts.split(",")]
    records = json.loads(DATA.read_text(encoding="utf-8"))
    prompts = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in records][: args.requests]
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-bench-engines-"))
    names = make_adapters(args.base, tmp, args.adapters) if args.adapters else []
    adapters = {n: tmp / n for n in names}
    python = vllm_deploy.vllm_python(args.vllm_python)
    plan = vllm_deploy.plan([f"{n}={d}" for n, d in adapters.items()], args.base, dtype=dtype)
    jinja = tmp / "chat_template.jinja"
    jinja.write_text(vllm_deploy.chat_template_text(plan), encoding="utf-8")
    vllm_args = vllm_deploy.vllm_args(
        plan,
        model=plan.model,
        adapter_dirs={n: str(d) for n, d in adapters.items()},
        chat_template=str(jinja),
        port=free_port(),
        max_num_seqs=max(args.max_batch_size, max(counts)),
    )
    vllm = vllm_deploy.VllmServer(python, vllm_args, tmp / "vllm.log")
    port = free_port()
    lk = start_lorakit(args, adapters, dtype, port, plan.template.name if names else None)
    urls = {"lorakit": f"http://127.0.0.1:{port}", "vllm": vllm.url}
    try:
        wait_ready(urls["lorakit"], lk)
        vllm.wait_ready()
        models = [plan.served_name] + names
        lk_models = [args.base] + names
        stops = vllm_deploy.client_stops(plan)
        clients = {
            e: openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=900) for e, u in urls.items()
        }

        def ask(engine, i, prompt):
            model = (models if engine == "vllm" else lk_models)[i % len(models)]
            r = clients[engine].chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=args.max_tokens,
                temperature=0,
                **({"stop": stops} if stops and engine == "vllm" else {}),
            )
            return (r.choices[0].message.content or "").strip(), r.usage.completion_tokens

        for engine in urls:  # warm-up
            ask(engine, 0, prompts[0])
        figures: dict[str, dict[int, list[float]]] = {e: {c: [] for c in counts} for e in urls}
        answers: dict[str, dict[int, str]] = {e: {} for e in urls}
        for rnd in range(args.rounds):
            order = list(urls) if rnd % 2 == 0 else list(urls)[::-1]
            for engine in order:
                for c in counts:
                    t = time.perf_counter()
                    with ThreadPoolExecutor(c) as pool:
                        out = list(pool.map(lambda j, e=engine: ask(e, j, prompts[j]), range(len(prompts))))
                    seconds = time.perf_counter() - t
                    figures[engine][c].append(sum(n for _, n in out) / seconds)
                    answers[engine].update({j: a for j, (a, _) in enumerate(out)})
                    print(f"round {rnd + 1} {engine} {c} clients: {figures[engine][c][-1]:.1f} tok/s", file=sys.stderr)
    finally:
        lk.terminate()
        lk.wait(30)
        vllm.stop()
    median = {e: {c: round(statistics.median(v), 1) for c, v in per.items()} for e, per in figures.items()}
    same = sum(answers["lorakit"][j] == answers["vllm"][j] for j in range(len(prompts)))
    result = {
        "base": args.base,
        "device": "cuda" if gpu else "cpu",
        "dtype": dtype,
        "adapters": len(names),
        "requests": len(prompts),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "vllm_version": vllm_deploy.vllm_version(python),
        "tokens_per_s": median,
        "ratio_vllm_vs_lorakit": {c: round(median["vllm"][c] / median["lorakit"][c], 2) for c in counts},
        "per_round": {e: {c: [round(x, 1) for x in v] for c, v in per.items()} for e, per in figures.items()},
        "greedy_answers_identical_between_engines": f"{same}/{len(prompts)}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
