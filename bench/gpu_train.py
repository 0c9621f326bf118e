#!/usr/bin/env python3
"""GPU training benchmark: lorakit beside the tuned transformers.Trainer + peft recipe, LoRA and QLoRA.

One invocation does everything, for one run on a GPU machine (one H100/H200, 10 minutes):

1. Builds a Llama-architecture model of about 1.07B parameters with random weights (hidden 2048,
   16 layers, intermediate 8192, 32 heads, 8 kv heads, tied embeddings: Llama-3.2-1B's shape) on
   the SmolLM2 tokenizer's vocabulary (49152), and saves it (bf16 safetensors) with the tokenizer to
   a temp folder that both recipes load.
2. Writes the training data from real Alpaca text (--data; see "Files" below). Alpaca rows are short
   (~150 tokens), so by default consecutive rows are joined into one example of up to --cutoff
   tokens (the first row's prompt, then the later rows' prompts and answers as answer text); both
   recipes read the same file, so they train on the same tokens. --no-concat keeps the rows as they
   are. Every figure counts real tokens only (padding excluded).
3. Runs, each in its own process, interleaved (the order inside a pair alternates per repeat):
     LoRA:   ../shared/bench/seed_recipe.py --variant tuned (bf16 autocast over an fp32 base,
             prompt masked, length grouping) and `lorakit train` (precision bf16, group_by_length),
             both LoRA r=16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down_proj, same micro-batch,
             same steps, learning rate 3e-4, batch = micro-batch (no accumulation).
     QLoRA:  the same pair with the base in 4-bit NF4 (double quantization, bf16 compute). lorakit:
             load_in_4bit: true. seed_recipe.py has no 4-bit option, so for the tuned recipe this
             script's wrapper patches AutoModelForCausalLM.from_pretrained to pass the same
             BitsAndBytesConfig (device_map {"": 0}) and then calls peft's
             prepare_model_for_kbit_training (gradient checkpointing off, as in lorakit's run).
             Still different: lorakit's QLoRA optimizer is paged 8-bit AdamW, the tuned recipe keeps
             the Trainer's default AdamW (LoRA state ~90 MB either way).
   Each run is executed through a small wrapper (this file, --child) that runpy-runs the recipe and
   adds a callback to transformers.Trainer, so both are measured the same way:
     tokens/s   real tokens (attention-mask sum per micro-batch, counted in Trainer.training_step)
                of the steps after --warmup-steps, over the time between the end of step
                --warmup-steps and the end of the last step (CUDA synchronised at both ends);
     memory     torch.cuda.max_memory_allocated at the end of the last step (MiB; model load and
                training, before lorakit's adapter save), the process's peak RSS without CUDA;
     loss       the Trainer's train_loss (mean over all steps; both recipes mask the prompt);
     MFU        tokens/s x FLOPs per token / peak, FLOPs per token = 4*N + 12*L*d*s: N the matmul
                parameters (every Linear, lm_head included once; 1.07B), forward 2N plus backward
                activation gradients 2N (the frozen base gets no weight gradients; the LoRA
                matmuls, <2% here, are not counted), and attention fwd+bwd 12*L*d*s at the
                examples' token-weighted mean length s (QK^T and AV counted in full, not halved for
                the causal mask). Peak: --peak-tflops, else 989 TFLOP/s (dense bf16 datasheet
                figure of the H100 SXM and the H200; 756 for an H100 PCIe, 312 for an A100) detected
                from torch.cuda.get_device_name. A bf16 matmul measured ~790 TFLOP/s on this
                workplace's H200, so the practical ceiling is about 0.8 of the datasheet.
   Each recipe's own figures (tuned: whole run incl. warmup; lorakit: manifest.json) are kept too.
4. Prints a table (medians over --repeats: the run with the median tokens/s), and ends with one JSON
   line: tokens/s and memory ratios lorakit/tuned for LoRA and QLoRA. --out FILE also writes
   everything (runs, settings, notes) as JSON, rewritten after every run so a cut-off run leaves
   what it measured.

The target from the issue (this script only measures): on an H100, lorakit >= 1.8x the tuned
recipe's tokens/s and <= 0.6x its peak memory, at the same micro-batch.

Files the GPU machine needs (only the repo's working tree travels there, not ../shared or the
lorakit cache), put into an ignored folder and carried, on this machine from the repo root:

    grep -qxF .gpu_carry/ .git/info/exclude 2>/dev/null || echo .gpu_carry/ >> .git/info/exclude
    mkdir -p .gpu_carry/tokenizer .gpu_carry/whl
    cp ~/.cache/lorakit/models/smollm2-135m/{tokenizer.json,tokenizer_config.json,chat_template.jinja} \
       .gpu_carry/tokenizer/     # a few MB; also special_tokens_map.json where there is one; NOT the weights
    cp ../shared/bench/seed_recipe.py ../shared/datasets/alpaca_en_demo.json .gpu_carry/
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
       --platform manylinux2014_x86_64 -d .gpu_carry/whl bitsandbytes==0.50.2 pydantic==2.13.4 \
       pydantic-core==2.46.4 annotated-types typing-inspection==0.4.2 datasets==5.2.0 dill==0.4.1 \
       multiprocess==0.70.19

(The wheels, ~45 MB of which bitsandbytes is 43, are what lorakit and QLoRA need beyond the GPU
image's package list (KINDS.md): pydantic and datasets for lorakit, bitsandbytes for 4-bit; the
GPU machine's python3 is 3.12, hence cp312. Without a working bitsandbytes the QLoRA pair is
skipped with a note; a missing lorakit dependency stops the script at once with the list, before
any training, and so does a transformers without TrainingArguments.train_sampling_strategy (both
recipes set it): then carry a transformers wheel too, e.g. 5.24.0, ~12 MB, which brings the
carried files near the 64 MiB limit.) The defaults find .gpu_carry/tokenizer,
.gpu_carry/seed_recipe.py and .gpu_carry/alpaca_en_demo.json by themselves (or pass --tokenizer,
--seed-recipe, --data). The device command, one call, carry [".gpu_carry"], timeout_s 600:

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .gpu_carry/whl/*.whl && export PYTHONPATH=/tmp/site || exit 1; \
    PYTHONUNBUFFERED=1 python3 bench/gpu_train.py --out $OUT/gpu_train.json --steps 30 --repeats 2 \
      2>&1 | tee $OUT/gpu_train.log

It keeps to --budget-s (default 480 s, model build included): a repeat that would not finish in
time is skipped and noted, so the command ends inside the 10-minute limit. Expected: build ~1 min,
each run ~20-60 s (process start and model load dominate; 30 steps of 8 x ~870 tokens).

Here, without a GPU: `nice -n 19 python bench/gpu_train.py --tiny` (hidden 64, 2 layers, cutoff
128, 3 steps, micro-batch 2; QLoRA skipped without CUDA) checks the whole path end to end.

usage: gpu_train.py [--tiny] [--steps 30] [--warmup-steps 5] [--micro-batch 8] [--cutoff 1024]
                    [--repeats 1] [--data FILE] [--tokenizer DIR] [--seed-recipe PATH] [--out FILE]
                    [--peak-tflops T] [--skip-qlora] [--no-concat] [--budget-s 480] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu_carry"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA, LORA_DROPOUT, LR = 16, 32, 0.05, 3e-4
# Llama-3.2-1B's shape; vocabulary from the tokenizer
FULL_MODEL = dict(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8)
TINY_MODEL = dict(hidden=64, layers=2, intermediate=256, heads=4, kv_heads=2)
TARGET = {"tokens_per_s_ratio_min": 1.8, "memory_ratio_max": 0.6, "gpu": "H100"}
# The Alpaca-LoRA template: seed_recipe.py's and lorakit's `alpaca` template are this text.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


# ---------------------------------------------------------------------------------------------
# Child side: runs inside the process of one recipe (or of the model build)
# ---------------------------------------------------------------------------------------------
def child_build(spec: dict) -> dict:
    """Random-weight Llama saved as bf16 safetensors with the tokenizer; reports what the parent
    needs (parameter counts, device, whether lorakit's dependencies and bitsandbytes work here)."""
    import importlib

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    missing = {}
    for name in ("lorakit.cli", "lorakit.train.recipe", "pydantic", "datasets", "peft", "accelerate", "yaml"):
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or a package that fails while importing
            missing[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    from transformers import TrainingArguments, __version__

    if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:  # both recipes set it
        missing["transformers"] = f"{__version__} has no TrainingArguments.train_sampling_strategy"
    cuda = torch.cuda.is_available()
    bnb = None
    try:
        import bitsandbytes

        bnb = {"version": bitsandbytes.__version__}
        if cuda:  # importable is not enough: the CUDA library must load and quantize
            from bitsandbytes.functional import quantize_4bit

            quantize_4bit(torch.randn(64, 64, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
    except Exception as e:
        bnb = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}

    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    m = spec["model"]
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=m["hidden"],
        intermediate_size=m["intermediate"],
        num_hidden_layers=m["layers"],
        num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"],
        head_dim=m["hidden"] // m["heads"],
        max_position_embeddings=max(2048, spec["cutoff"]),
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # random init on the GPU: seconds, not a minute
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.save_pretrained(spec["out"])
    tok.save_pretrained(spec["out"])
    # every Linear, lm_head included: tied, it is one parameter but still one matmul per token;
    # the embedding lookup does no matmul
    matmul = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "matmul_params": matmul,
        "layers": m["layers"],
        "hidden": m["hidden"],
        "vocab": len(tok),
        "cuda": cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "bitsandbytes": bnb,
        "missing": missing,
        "build_s": round(time.time() - t0, 1),
    }


def child_recipe(spec: dict) -> dict:
    """Run seed_recipe.py or `lorakit train` in this process, measured by a Trainer callback."""
    import runpy
    import traceback

    import torch
    from transformers import Trainer, TrainerCallback

    cuda = torch.cuda.is_available()
    warmup = spec["warmup_steps"]
    live = {"tokens": 0, "marks": {}, "train_loss": None, "peak": None, "steps": 0}

    def mark(name: str) -> None:
        if cuda:
            torch.cuda.synchronize()
        tokens = live["tokens"]
        live["marks"][name] = (time.perf_counter(), int(tokens) if not isinstance(tokens, int) else tokens)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            mark("begin")
            if warmup == 0:
                mark("warm")

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                mark("warm")
            if state.global_step == state.max_steps:
                mark("end")
                if cuda:
                    live["peak"] = torch.cuda.max_memory_allocated() / 2**20
                    live["reserved"] = torch.cuda.max_memory_reserved() / 2**20
                else:
                    import resource

                    live["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            live["steps"] = state.global_step

        def on_train_end(self, args, state, control, **kw):
            losses = [h["train_loss"] for h in state.log_history if "train_loss" in h]
            live["train_loss"] = losses[-1] if losses else None

    original_init, original_step = Trainer.__init__, Trainer.training_step

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(Clock())
        # what the recipe trains on, for the record: 4-bit layers (QLoRA) and the frozen base's dtype
        modules = list(self.model.modules())
        live["base_4bit_layers"] = sum(type(m).__module__.startswith("bitsandbytes") for m in modules)
        live["embedding_dtype"] = str(self.model.get_input_embeddings().weight.dtype).removeprefix("torch.")

    def training_step(self, model, inputs, *args, **kwargs):
        # the batch as the Trainer got it (lorakit's compute_loss drops the mask later); no sync:
        # the count stays a device tensor until a mark reads it
        mask = inputs.get("attention_mask")
        live["tokens"] = live["tokens"] + (mask.sum() if mask is not None else inputs["input_ids"].numel())
        return original_step(self, model, inputs, *args, **kwargs)

    Trainer.__init__, Trainer.training_step = init, training_step

    if spec["recipe"] == "tuned" and spec["quant"] == "4bit":
        # seed_recipe.py has no 4-bit option: the same QLoRA load lorakit does (NF4, double
        # quantization, bf16 compute, non-quantized weights fp32), then peft's k-bit preparation.
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        original_load = AutoModelForCausalLM.from_pretrained

        def from_pretrained(*args, **kwargs):
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            kwargs["device_map"] = {"": 0 if cuda else "cpu"}
            model = original_load(*args, **kwargs)
            return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

        AutoModelForCausalLM.from_pretrained = from_pretrained

    code, error = 0, None
    try:
        if spec["recipe"] == "tuned":
            sys.argv = [spec["script"], *spec["argv"]]
            runpy.run_path(spec["script"], run_name="__main__")
        else:
            sys.argv = ["lorakit", *spec["argv"]]
            runpy.run_module("lorakit.cli", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        traceback.print_exc()
        code, error = 1, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    marks = live["marks"]
    result = {"exit_code": code, "error": error, "steps": live["steps"], "train_loss": live["train_loss"]}
    result.update({k: live[k] for k in ("base_4bit_layers", "embedding_dtype") if k in live})
    if "warm" in marks and "end" in marks:
        (t_w, tok_w), (t_e, tok_e) = marks["warm"], marks["end"]
        (t_b, _) = marks["begin"]
        result.update(
            timed_steps=live["steps"] - warmup,
            timed_tokens=tok_e - tok_w,
            timed_s=round(t_e - t_w, 3),
            tokens_per_s=round((tok_e - tok_w) / (t_e - t_w), 1) if t_e > t_w else None,
            all_tokens=tok_e,
            all_s=round(t_e - t_b, 3),
            all_tokens_per_s=round(tok_e / (t_e - t_b), 1) if t_e > t_b else None,
            peak_mib=round(live["peak"], 1),
            reserved_mib=round(live["reserved"], 1) if "reserved" in live else None,
            memory_kind="cuda_max_allocated" if cuda else "process_rss",
        )
    if cuda:
        result["exit_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = child_build(spec) if spec["role"] == "build" else child_recipe(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0 if spec["role"] == "build" else int(result["exit_code"] or 0)


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------
def first_existing(candidates: list[Path], what: str, flag: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    sys.exit(f"gpu_train: no {what} found ({', '.join(map(str, candidates))}); pass {flag}")


def default_tokenizer_candidates() -> list[Path]:
    try:
        sys.path.insert(0, str(REPO / "src"))
        from lorakit.models.registry import DEFAULT_BASE_MODEL, lorakit_home

        cached = lorakit_home() / "models" / DEFAULT_BASE_MODEL
    except ImportError:  # lorakit's own dependencies missing: the same path lorakit_home() gives
        home = os.environ.get("LORAKIT_HOME") or Path.home() / ".cache" / "lorakit"
        cached = Path(home).expanduser() / "models" / "smollm2-135m"
    return [CARRY / "tokenizer", cached]


def load_alpaca(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [
        {
            "instruction": r.get("instruction", ""),
            "input": r.get("input", r.get("context", "")) or "",
            "output": r.get("output", r.get("response", "")),
        }
        for r in rows
    ]


def prompt_of(r: dict) -> str:
    return PROMPT_INPUT.format(**r) if r["input"] else PROMPT_NO_INPUT.format(instruction=r["instruction"])


def build_examples(records: list[dict], tokenizer, cutoff: int, n: int, concat: bool) -> tuple[list[dict], dict]:
    """n examples; with concat, consecutive rows joined while the example stays within cutoff
    tokens (the first row's prompt; the later rows' whole text as more answer)."""
    full = [prompt_of(r) + r["output"] for r in records]
    lengths = [len(ids) for ids in tokenizer(full, add_special_tokens=False)["input_ids"]]
    margin = 8  # EOS, the joining blank lines, token merges at the seams
    out, i, count = [], 0, len(records)
    while len(out) < n:
        first, total = records[i % count], lengths[i % count]
        i += 1
        parts = [first["output"]]
        while concat and total + lengths[i % count] + margin <= cutoff:
            parts.append(full[i % count])
            total += lengths[i % count] + 2
            i += 1
        out.append({"instruction": first["instruction"], "input": first["input"], "output": "\n\n".join(parts)})
    # the real tokens each recipe trains on: prompt + answer + EOS, truncated at cutoff
    texts = [prompt_of(r) + r["output"] + tokenizer.eos_token for r in out]
    untruncated = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    real = [min(n_ids, cutoff) for n_ids in untruncated]
    stats = {
        "examples": n,
        "rows_used": i,
        "rows_in_file": count,
        "concat": concat,
        "real_tokens": sum(real),
        "mean_len": round(sum(real) / n, 1),
        "max_len": max(real),
        "truncated": sum(u > cutoff for u in untruncated),
        # token-weighted mean length: the s in the attention FLOPs per token
        "attn_len": round(sum(x * x for x in real) / sum(real), 1),
    }
    return out, stats


def child_env(tiny: bool) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    if tiny:  # a shared 2-core machine: keep the check small
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_child(spec: dict, work: Path, name: str, timeout: float, env: dict) -> tuple[dict | None, str]:
    """(result, log tail); result None when the child died without writing one."""
    spec = {**spec, "result": str(work / f"{name}.result.json")}
    spec_file, log_file = work / f"{name}.spec.json", work / f"{name}.log"
    spec_file.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    tail = log_file.read_text(errors="replace")[-3000:]
    result_path = Path(spec["result"])
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if result is None:
        return None, f"exit {code}: {tail}"
    return result, tail


def lorakit_yaml(work: Path, tag: str, model_dir: Path, data: Path, a, quant: str) -> Path:
    out = work / f"lorakit-out-{tag}"
    cfg = work / f"lorakit-{tag}.yaml"
    cfg.write_text(
        f"base_model: {model_dir}\ndata_path: {data}\noutput_dir: {out}\noverwrite_output_dir: true\n"
        "prompt_template_name: alpaca\nadd_eos_token: true\nprecision: bf16\n"
        f"load_in_4bit: {'true' if quant == '4bit' else 'false'}\n"
        f"cutoff_len: {a.cutoff}\nbatch_size: {a.micro_batch}\nmicro_batch_size: {a.micro_batch}\n"
        f"max_steps: {a.steps}\nlearning_rate: {LR}\nlora_r: {LORA_R}\nlora_alpha: {LORA_ALPHA}\n"
        f"lora_dropout: {LORA_DROPOUT}\nlora_target_modules: [{', '.join(TARGETS)}]\nval_set_size: 0\n"
        f"seed: 42\nlogging_steps: {max(a.steps // 4, 1)}\nsave_steps: {a.steps + 1}\nreport_to: []\n"
        "group_by_length: true\n",  # the tuned recipe's sampling
        encoding="utf-8",
    )
    return cfg


def self_reported(recipe: str, log_tail: str, work: Path, tag: str) -> dict:
    """The recipe's own figures: seed_recipe.py's JSON line, lorakit's manifest.json."""
    try:
        if recipe == "tuned":
            lines = [x for x in log_tail.splitlines() if x.startswith("{") and x.endswith("}")]
            own = json.loads(lines[-1])
            return {"tokens_per_s": own.get("tokens_per_s"), "train_loss": own.get("train_loss")}
        t = json.loads((work / f"lorakit-out-{tag}" / "manifest.json").read_text())["training"]
        return {
            "tokens_per_s": t.get("tokens_per_s"),
            "train_loss": t.get("train_loss"),
            "peak": t.get("peak_memory_mib"),
        }
    except (IndexError, ValueError, OSError, KeyError):
        return {}


def peak_tflops_for(device_name: str) -> tuple[float | None, str]:
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return 756.0, "H100 PCIe dense bf16 (datasheet)"
    if any(k in name for k in ("H100", "H200", "H800", "GH200")):
        return 989.0, "H100 SXM / H200 dense bf16 (datasheet)"
    if "A100" in name:
        return 312.0, "A100 dense bf16 (datasheet)"
    return None, f"unknown peak for {device_name!r}: pass --peak-tflops"


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (its own memory and loss), as bench/train_throughput.py."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model and run: checks the script end to end on CPU")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; tiny 3)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="steps left out of tokens/s (default 5; tiny 1)")
    ap.add_argument(
        "--micro-batch", type=int, default=None, help="examples per step, both recipes (default 8; tiny 2)"
    )
    ap.add_argument("--cutoff", type=int, default=None, help="max tokens per example (default 1024; tiny 128)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of each pair; medians reported")
    ap.add_argument("--data", type=Path, default=None, help="Alpaca .json/.jsonl (default: the alpaca demo file)")
    ap.add_argument("--no-concat", dest="concat", action="store_false", help="one Alpaca row per example")
    ap.add_argument("--tokenizer", type=Path, default=None, help="SmolLM2 tokenizer folder (default: see doc)")
    ap.add_argument("--seed-recipe", type=Path, default=None, help="seed_recipe.py (default: see doc)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: by GPU)")
    ap.add_argument("--skip-qlora", action="store_true", help="LoRA pair only")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting runs that would end past this")
    ap.add_argument("--out", type=Path, default=None, help="write all results to this JSON file")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temp folder goes (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (model, data, logs)")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a lorakit override"
    )
    a = ap.parse_args(argv)
    tiny_defaults = dict(steps=3, warmup_steps=1, micro_batch=2, cutoff=128)
    full_defaults = dict(steps=30, warmup_steps=5, micro_batch=8, cutoff=1024)
    for key, value in (tiny_defaults if a.tiny else full_defaults).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if not 0 <= a.warmup_steps < a.steps:
        ap.error("--warmup-steps must be at least 0 and below --steps")
    return a


def main(argv: list[str]) -> int:
    started = time.time()
    a = parse_args(argv)
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        print(f"note: {text}", flush=True)

    tokenizer_dir = a.tokenizer or first_existing(default_tokenizer_candidates(), "tokenizer folder", "--tokenizer")
    if (
        not (Path(tokenizer_dir) / "tokenizer.json").is_file()
        and not (Path(tokenizer_dir) / "tokenizer.model").exists()
    ):
        sys.exit(f"gpu_train: {tokenizer_dir} holds no tokenizer.json; pass --tokenizer")
    recipe = a.seed_recipe or first_existing(
        [
            Path("/work/shared/bench/seed_recipe.py"),
            REPO.parent / "shared/bench/seed_recipe.py",
            CARRY / "seed_recipe.py",
        ],
        "seed_recipe.py",
        "--seed-recipe",
    )
    alpaca_candidates = [
        CARRY / "alpaca_en_demo.json",
        REPO.parent / "shared/datasets/alpaca_en_demo.json",
        Path("/work/shared/datasets/alpaca_en_demo.json"),
    ]
    data_file = a.data or next((p for p in alpaca_candidates if p.is_file()), None)

    base = Path(a.workdir) if a.workdir else None
    if base:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-train-", dir=base))
    env = child_env(a.tiny)
    payload: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}}
    try:
        # 1. the model ---------------------------------------------------------------------
        model_dir = work / "model"
        print(f"building the {'tiny' if a.tiny else '~1B'} Llama model in {model_dir} ...", flush=True)
        spec = {
            "role": "build",
            "tokenizer": str(tokenizer_dir),
            "out": str(model_dir),
            "cutoff": a.cutoff,
            "model": TINY_MODEL if a.tiny else FULL_MODEL,
        }
        built, log = run_child(spec, work, "build", max(a.budget_s, 120), env)
        if built is None:
            sys.exit(f"gpu_train: the model build failed:\n{log}")
        if built["missing"]:
            sys.exit(
                "gpu_train: lorakit cannot run here, missing: "
                + "; ".join(f"{k} ({v})" for k, v in built["missing"].items())
                + " (carry the wheels: see the module docstring)"
            )
        if not built["cuda"] and not a.tiny:
            sys.exit("gpu_train: no CUDA device; the full run is for a GPU machine (use --tiny here)")
        print(
            f"model: {built['params'] / 1e6:.1f}M parameters ({built['matmul_params'] / 1e6:.1f}M in matmuls), "
            f"vocab {built['vocab']}, built in {built['build_s']}s on {built['device_name']}",
            flush=True,
        )
        peak, peak_source = (
            (a.peak_tflops, "--peak-tflops") if a.peak_tflops else peak_tflops_for(built["device_name"])
        )
        if not built["cuda"]:
            peak, peak_source = None, "no GPU: MFU not computed"
        payload["model"] = built

        # 2. the data ------------------------------------------------------------------------
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if data_file is None:
            sys.path.insert(0, str(REPO / "src"))
            from lorakit.data.demo import train_records

            records = train_records()
            note(
                "no Alpaca file found (.gpu_carry/alpaca_en_demo.json, ../shared/datasets/): using lorakit's "
                "bundled persona records (Alpaca format, short, not real Alpaca text)"
            )
        else:
            records = load_alpaca(Path(data_file))
        examples, data_stats = build_examples(records, tok, a.cutoff, a.steps * a.micro_batch, a.concat)
        data_stats["source"] = str(data_file) if data_file else "lorakit.data.demo.train_records()"
        train_file = work / "train.json"
        train_file.write_text(json.dumps(examples, ensure_ascii=False), encoding="utf-8")
        print(
            f"data: {data_stats['examples']} examples from {data_stats['rows_used']} rows of {data_stats['source']}"
            f"{' (rows joined up to cutoff)' if a.concat else ''}: {data_stats['real_tokens']} real tokens, "
            f"mean {data_stats['mean_len']}, max {data_stats['max_len']}, {data_stats['truncated']} truncated",
            flush=True,
        )
        flops_per_token = 4 * built["matmul_params"] + 12 * built["layers"] * built["hidden"] * data_stats["attn_len"]
        payload.update(
            data=data_stats,
            mfu={
                "formula": "tokens/s * (4*N + 12*L*d*s) / peak; N matmul params, s token-weighted mean length",
                "flops_per_token": flops_per_token,
                "peak_tflops": peak,
                "peak_source": peak_source,
            },
            target=TARGET,
        )

        # 3. the runs ------------------------------------------------------------------------
        modes = ["lora"]
        if a.skip_qlora:
            note("QLoRA skipped (--skip-qlora)")
        elif not built["cuda"]:
            note("QLoRA skipped: no CUDA device (bitsandbytes 4-bit training needs a GPU)")
        elif "error" in (built["bitsandbytes"] or {}):
            note(f"QLoRA skipped: bitsandbytes does not work here ({built['bitsandbytes']['error']})")
        else:
            modes.append("qlora")
        common = [
            "--model", str(model_dir), "--data", str(train_file), "--variant", "tuned",
            "--steps", str(a.steps), "--micro-batch", str(a.micro_batch), "--cutoff", str(a.cutoff),
            "--r", str(LORA_R), "--alpha", str(LORA_ALPHA), "--targets", ",".join(TARGETS), "--seed", "42",
        ]  # fmt: skip
        runs: list[dict] = []
        durations: dict[str, float] = {}
        payload["runs"] = runs
        for rep in range(a.repeats):
            for mode in modes:
                pair = ["tuned", "lorakit"] if rep % 2 == 0 else ["lorakit", "tuned"]
                # a pair runs whole or not at all: half a pair gives no ratio
                elapsed = time.time() - started
                fallback = 1.5 * max(durations.values(), default=0.0)
                estimate = sum(durations.get(f"{mode}-{r}", fallback) for r in pair)
                if elapsed + estimate > a.budget_s:
                    note(f"{mode} repeat {rep + 1} skipped: {elapsed:.0f}s gone, ~{estimate:.0f}s more > --budget-s")
                    continue
                for recipe_name in pair:
                    key = f"{mode}-{recipe_name}"
                    elapsed = time.time() - started
                    tag = f"{key}-{rep}"
                    quant = "4bit" if mode == "qlora" else "none"
                    if recipe_name == "tuned":
                        spec = {"recipe": "tuned", "script": str(recipe), "argv": common}
                    else:
                        cfg = lorakit_yaml(work, tag, model_dir, train_file, a, quant)
                        spec = {"recipe": "lorakit", "argv": ["train", str(cfg), *a.overrides]}
                    spec.update(role="recipe", quant=quant, warmup_steps=a.warmup_steps)
                    t0 = time.time()
                    timeout = max(a.budget_s - elapsed, 60.0)
                    result, log = run_child(spec, work, tag, timeout, env)
                    durations[key] = time.time() - t0
                    run = {"mode": mode, "recipe": recipe_name, "repeat": rep, "process_s": round(durations[key], 1)}
                    if result is None or result.get("exit_code") or result.get("tokens_per_s") is None:
                        code = (result or {}).get("exit_code")
                        run["error"] = (
                            "no result"
                            if result is None
                            else result.get("error") or (f"exit {code}" if code else "no timing (steps < warmup?)")
                        )
                        run["log_tail"] = log[-2000:]
                        print(f"{key} repeat {rep + 1}: FAILED ({run['error']})\n{log[-2000:]}", flush=True)
                    else:
                        run.update(result)
                        run["self_reported"] = self_reported(recipe_name, log, work, tag)
                        if peak and run["tokens_per_s"]:
                            run["mfu"] = round(run["tokens_per_s"] * flops_per_token / (peak * 1e12), 4)
                        print(
                            f"{key} repeat {rep + 1}: {run['tokens_per_s']:.1f} tokens/s, peak "
                            f"{run['peak_mib']:.0f} MiB, loss {run['train_loss']:.4f} ({run['process_s']}s)",
                            flush=True,
                        )
                    runs.append(run)
                    payload["notes"] = notes
                    write_json(a.out, payload)

        # 4. the report ----------------------------------------------------------------------
        good = [r for r in runs if not r.get("error")]
        for mode in modes:
            for recipe_name in ("tuned", "lorakit"):
                rs = [r for r in good if r["mode"] == mode and r["recipe"] == recipe_name]
                if len(rs) > 1:
                    per = ", ".join(f"{r['tokens_per_s']:.1f}" for r in rs)
                    print(f"{mode} {recipe_name}: tokens/s per repeat {per}")
        mem_label = "peak MiB" if built["cuda"] else "peak RSS MiB"
        print(
            f"\n{'mode':<7}{'recipe':<9}{'tokens/s':>11}{mem_label:>14}{'train loss':>12}{'MFU':>8}"
            f"{'steps':>7}{'timed s':>9}{'own tok/s':>11}"
        )
        summary: dict = {
            "device": built["device_name"],
            "memory_kind": "cuda_max_allocated" if built["cuda"] else "rss",
        }
        for mode in ["lora", "qlora"]:
            if mode not in modes:
                summary[mode] = {"skipped": next((n for n in notes if n.startswith("QLoRA skipped")), "skipped")}
                continue
            med = {}
            for recipe_name in ("tuned", "lorakit"):
                rs = [r for r in good if r["mode"] == mode and r["recipe"] == recipe_name]
                if not rs:
                    print(f"{mode:<7}{recipe_name:<9}{'failed':>11}")
                    continue
                r = med[recipe_name] = median_run(rs)
                mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
                own = r["self_reported"].get("tokens_per_s")
                print(
                    f"{mode:<7}{recipe_name:<9}{r['tokens_per_s']:>11.1f}{r['peak_mib']:>14.0f}"
                    f"{r['train_loss']:>12.4f}{mfu:>8}{r['timed_steps']:>7}{r['timed_s']:>9.2f}"
                    f"{own if own is not None else 'n/a':>11}"
                )
            tu, lk = med.get("tuned", {}), med.get("lorakit", {})
            summary[mode] = {
                "tuned_tokens_per_s": tu.get("tokens_per_s"),
                "lorakit_tokens_per_s": lk.get("tokens_per_s"),
                "tokens_per_s_ratio": ratio(lk.get("tokens_per_s"), tu.get("tokens_per_s")),
                "tuned_peak_mib": tu.get("peak_mib"),
                "lorakit_peak_mib": lk.get("peak_mib"),
                "memory_ratio": ratio(lk.get("peak_mib"), tu.get("peak_mib")),
                "tuned_loss": tu.get("train_loss"),
                "lorakit_loss": lk.get("train_loss"),
                "tuned_mfu": tu.get("mfu"),
                "lorakit_mfu": lk.get("mfu"),
                "runs": len([r for r in good if r["mode"] == mode]),
            }
        summary.update(
            micro_batch=a.micro_batch,
            cutoff=a.cutoff,
            steps=a.steps,
            warmup_steps=a.warmup_steps,
            repeats=a.repeats,
            mean_len=data_stats["mean_len"],
            target=TARGET,
            wall_s=round(time.time() - started, 1),
        )
        payload.update(summary=summary, notes=notes)
        write_json(a.out, payload)
        print(json.dumps(summary), flush=True)
        failed = [r for r in runs if r.get("error")]
        return 1 if failed or not good else 0
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
