"""The machine a benchmark ran on, named in its output: the figures depend on it.

Imported by the bench scripts (run as ``python bench/NAME.py``, so this folder is on the path).
"""

from __future__ import annotations

import os

# FLOPs per trained token with a frozen base: forward 2N + backward to the inputs 2N (N = 135M)
FLOPS_PER_TOKEN = 4 * 135e6


def matmul_gflops(dtype) -> float:
    """The best rate of a few of smollm2-135m's own matmul shapes (a micro-batch of ~800 tokens)."""
    import time

    import torch

    best = 0.0
    for m, k, n in ((800, 576, 1536), (800, 1536, 576), (800, 576, 576)):
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.3:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return round(best, 1)


def machine_facts() -> dict:
    """What the figures depend on: the CPU, its native bf16 or not, the matmul rates it reaches.

    On a CPU without native bf16 (no avx512_bf16 / amx_bf16: AVX2-only Zen 3, older Xeons)
    torch emulates bf16, and a matmul runs ~50-100x slower than in fp32. lorakit's
    `precision: auto` trains in fp32 there; the tuned recipe (../shared/bench/seed_recipe.py)
    always asks for bf16 autocast. So on such a machine ratio_vs_tuned measures that choice, not
    the training loop: the benchmark says so rather than print a ratio that reads like a speed-up.
    """
    import platform

    import torch

    from lorakit.models.loading import cpu_supports_bf16, resolve_precision

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        name = names[0] if names else name
    except OSError:
        pass
    facts = {
        "cpu": name,
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),  # the widest vector ISA torch uses here
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": cpu_supports_bf16(),
        "lorakit_precision": resolve_precision("auto"),
        "matmul_gflops_fp32": matmul_gflops(torch.float32),
        "matmul_gflops_bf16": matmul_gflops(torch.bfloat16),
    }
    peak = facts["matmul_gflops_bf16" if facts["lorakit_precision"] == "bf16" else "matmul_gflops_fp32"]
    facts["ceiling_tokens_per_s"] = round(peak * 1e9 / FLOPS_PER_TOKEN, 1)
    return facts


def describe(m: dict) -> str:
    """machine_facts() as the one line a benchmark prints first."""
    return (
        f"machine: {m['cpu']} ({m['cpu_isa']}), {m['cores']} cores, torch threads {m['torch_threads']}; "
        f"native bf16: {'yes' if m['native_bf16'] else 'no'}; matmul GFLOP/s fp32 {m['matmul_gflops_fp32']}, "
        f"bf16 {m['matmul_gflops_bf16']}; lorakit trains in {m['lorakit_precision']} here (precision: auto); "
        f"training ceiling ~{m['ceiling_tokens_per_s']:.0f} tokens/s"
    )
