#!/usr/bin/env python3
"""Generation throughput: base model, base + unmerged LoRA adapter, and the merged model.

Greedy decoding of a fixed number of new tokens (EOS ignored so every run does the same work),
on the default model (smollm2-135m) unless --base is given. The adapter is --adapter, or a LoRA
adapter (r=8 on q_proj,v_proj, random non-zero B) made for the measurement. Then batched
generation throughput at batch 1, 4 and 8. Ends with one JSON line.

The levers for a single user's wait, each with its answers compared to the plain run's:
  --static-cache  transformers' static KV cache with the decode step compiled (torch.compile,
                  inductor, on the CPU too); the first call's time (compilation) is reported apart.
  --bf16          the weights in bf16 (where the CPU has native bf16; emulated and slow elsewhere).
  --llama-cpp     the same model through llama.cpp (llama-cpp-python, `pip install 'lorakit[gguf]'`):
                  converted with llama.cpp's own convert_hf_to_gguf.py to f32 (the same numbers as
                  the fp32 model) and q8_0, batch 1 (llama-cpp-python's generate is one sequence).

usage: python bench/generate_throughput.py [--base B] [--adapter DIR] [--new-tokens 64] [--repeats 3]
                                           [--static-cache] [--bf16] [--llama-cpp]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine_facts import describe, machine_facts

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is.",
    "Name a famous painting.",
    "How do I boil an egg?",
    "What is 12 times 7?",
    "Describe a sunset in one sentence.",
]


def make_adapter(base_path: str, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_path),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(folder)
    return folder


def timed_generate(
    model, tokenizer, prompts: list[str], new_tokens: int, repeats: int, **extra
) -> tuple[float, torch.Tensor, float]:
    """(median tokens/s over repeats, the new ids, the first call's seconds): greedy, left-padded.

    The first call does the whole work once (for a compiled decode step, its compilation), then
    ``repeats`` timed calls."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(**batch, **kwargs)  # warm-up (and compilation, where there is one)
        first_s = time.perf_counter() - t0
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(**batch, **kwargs)
            rates.append((out.shape[1] - batch["input_ids"].shape[1]) * len(prompts) / (time.perf_counter() - t0))
    return statistics.median(rates), out[:, batch["input_ids"].shape[1] :], first_s


def tokens_per_s(model, tokenizer, prompts: list[str], new_tokens: int, repeats: int) -> float:
    return timed_generate(model, tokenizer, prompts, new_tokens, repeats)[0]


def static_cache_kwargs() -> dict:
    """generate()'s static KV cache with its decode step compiled, on any device (transformers
    compiles it by itself only on GPUs; ``_compile_all_devices`` is its switch for the CPU)."""
    from transformers import CompileConfig

    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    compile_config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": compile_config}


def same_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a == b).all(dim=1).sum())


def llama_cpp_rate(gguf: Path, ids: list[int], eos: int, new_tokens: int, repeats: int, threads: dict) -> tuple:
    """(median tokens/s, the new ids): llama.cpp greedy from the same prompt ids, EOS masked as
    transformers' min_new_tokens masks it, so both do the same work and their ids can be compared."""
    import numpy as np
    from llama_cpp import Llama, LogitsProcessorList

    def no_eos(_ids, scores):
        scores[eos] = -np.inf
        return scores

    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + new_tokens + 8, verbose=False, seed=0, **threads)
    rates, new = [], []
    for _ in range(repeats + 1):  # the first one warms the page cache
        new, t0 = [], time.perf_counter()
        for token in llm.generate(
            ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True,
            logits_processor=LogitsProcessorList([no_eos]),
        ):  # fmt: skip
            new.append(token)
            if len(new) >= new_tokens:
                break
        rates.append(len(new) / (time.perf_counter() - t0))
    llm.close()
    return statistics.median(rates[1:]), new


def llama_cpp_rows(base_path: str, tok, new_tokens: int, repeats: int, reference: torch.Tensor, work: Path) -> dict:
    """The base converted by llama.cpp's convert_hf_to_gguf.py (f32, q8_0), batch 1 through llama.cpp
    with lorakit's thread count (one per physical core), and f32 with llama-cpp-python's default
    where that differs: {row: (tokens/s median, leading tokens equal to transformers' fp32 answer, of)}."""
    import multiprocessing

    from lorakit.infer.gguf import find_llama_cpp, llama_threads, run_script

    tools = find_llama_cpp()
    ids = tok(PROMPTS[:1])["input_ids"][0]
    want = reference[0].tolist()
    ours = llama_threads()
    default = {"n_threads": max(multiprocessing.cpu_count() // 2, 1), "n_threads_batch": multiprocessing.cpu_count()}
    runs = [("f32", ours), ("q8_0", ours)]
    if default != ours:
        runs.insert(1, ("f32", default))
    rows = {}
    for outtype, threads in runs:
        gguf = work / f"base-{outtype}.gguf"
        if not gguf.is_file():
            run_script(tools, "convert_hf_to_gguf.py", [base_path, "--outfile", str(gguf), "--outtype", outtype])
        rate, got = llama_cpp_rate(gguf, ids, tok.eos_token_id, new_tokens, repeats, threads)
        agree = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
        rows[f"{outtype}, {threads['n_threads']} decode threads"] = (rate, agree, len(want))
    return rows


def _lever_row(run: tuple[float, torch.Tensor, float], plain_ids: torch.Tensor) -> tuple[float, float, int]:
    rate, ids, first_s = run
    return rate, first_s, same_rows(ids, plain_ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--adapter", type=Path, default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--static-cache", action="store_true", help="also: static KV cache + compiled decode step")
    ap.add_argument("--bf16", action="store_true", help="also: the weights in bf16")
    ap.add_argument("--llama-cpp", action="store_true", help="also: the same model through llama.cpp (f32, q8_0)")
    a = ap.parse_args()
    machine = machine_facts()
    print(describe(machine), flush=True)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import load_tokenizer, resolve_model_path

    torch.manual_seed(0)
    base_path = resolve_model_path(a.base)
    tok = load_tokenizer(base_path)
    with tempfile.TemporaryDirectory(prefix="lorakit-genbench-") as tmp:
        adapter = a.adapter or make_adapter(base_path, Path(tmp) / "adapter")
        one = PROMPTS[:1]
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        plain = {n: timed_generate(base, tok, PROMPTS[:n], a.new_tokens, a.repeats) for n in (1, 4, 8)}
        batched = {n: r[0] for n, r in plain.items()}
        r_base = batched[1]
        levers = {}  # name -> {batch: (tokens/s, first call s, answers equal to the plain run's)}
        if a.static_cache:
            levers["static cache + compiled decode"] = {
                n: _lever_row(
                    timed_generate(base, tok, PROMPTS[:n], a.new_tokens, a.repeats, **static_cache_kwargs()),
                    plain[n][1],
                )
                for n in (1, 8)
            }
        if a.bf16:
            half = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16).eval()
            levers["bf16 weights"] = {
                n: _lever_row(timed_generate(half, tok, PROMPTS[:n], a.new_tokens, a.repeats), plain[n][1])
                for n in (1, 8)
            }
            del half
        gguf_rows = (
            llama_cpp_rows(base_path, tok, a.new_tokens, a.repeats, plain[1][1], Path(tmp)) if a.llama_cpp else {}
        )
        unmerged = PeftModel.from_pretrained(base, str(adapter)).eval()
        r_unmerged = tokens_per_s(unmerged, tok, one, a.new_tokens, a.repeats)
        merged = unmerged.merge_and_unload().eval()
        r_merged = tokens_per_s(merged, tok, one, a.new_tokens, a.repeats)
        batched_merged = {n: tokens_per_s(merged, tok, PROMPTS[:n], a.new_tokens, a.repeats) for n in (1, 4, 8)}

    print(f"{'model':<22}{'tokens/s (batch 1)':>20}")
    for name, r in (("base", r_base), ("base + adapter", r_unmerged), ("merged", r_merged)):
        print(f"{name:<22}{r:>20.1f}")
    print(f"{'batch':<8}{'base tokens/s':>16}{'merged tokens/s':>18}")
    for n in (1, 4, 8):
        print(f"{n:<8}{batched[n]:>16.1f}{batched_merged[n]:>18.1f}")
    if levers or gguf_rows:
        print(
            f"{'base model, lever':<34}{'batch':>6}{'tokens/s':>10}{'vs plain':>10}"
            f"{'first call s':>14}{'same answers':>14}"
        )
        for name, rows in levers.items():
            for n, (rate, first_s, same) in rows.items():
                print(f"{name:<34}{n:>6}{rate:>10.1f}{rate / batched[n]:>10.2f}{first_s:>14.1f}{f'{same}/{n}':>14}")
        for outtype, (rate, agree, length) in gguf_rows.items():
            print(
                f"{'llama.cpp ' + outtype:<34}{1:>6}{rate:>10.1f}{rate / batched[1]:>10.2f}"
                f"{'':>14}{f'{agree}/{length} tokens':>14}"
            )
    print(
        json.dumps(
            {
                "base_tokens_per_s": round(r_base, 1),
                "unmerged_tokens_per_s": round(r_unmerged, 1),
                "merged_tokens_per_s": round(r_merged, 1),
                "merged_vs_base": round(r_merged / r_base, 3),
                "unmerged_vs_base": round(r_unmerged / r_base, 3),
                "batched_tokens_per_s": {str(n): round(v, 1) for n, v in batched.items()},
                "batched_merged_tokens_per_s": {str(n): round(v, 1) for n, v in batched_merged.items()},
                "threads": torch.get_num_threads(),
                "levers": {
                    name: {
                        str(n): {"tokens_per_s": round(r, 1), "first_call_s": round(f, 1), "same_answers": f"{k}/{n}"}
                        for n, (r, f, k) in rows.items()
                    }
                    for name, rows in levers.items()
                },
                "llama_cpp": {
                    o: {"tokens_per_s": round(r, 1), "vs_plain": round(r / batched[1], 3), "tokens_equal": f"{g}/{n}"}
                    for o, (r, g, n) in gguf_rows.items()
                },
                "machine": machine,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
