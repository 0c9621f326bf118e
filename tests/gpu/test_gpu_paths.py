"""lorakit's GPU paths, which CI (CPU only) never runs: QLoRA 4-bit and 8-bit training through the
recipe, fp16/bf16 training on CUDA, generation with an adapter on a quantized base, and the serving
engine's continuous batching on the GPU.

Everything runs offline on tiny random Llamas: the conftest's ``tiny_model_dir`` (hidden 64) and,
to tell shape problems of the bitsandbytes kernels from real failures, a slightly bigger one built
here (hidden 256). The whole module is skipped without CUDA; the 8/4-bit tests are skipped when
bitsandbytes cannot be imported. Run on a GPU machine with ``python -m pytest -q -s tests/gpu``:
each test prints one ``GPU-RESULT`` line (loss, peak GPU memory, time).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device: these tests exercise lorakit's GPU-only paths (QLoRA/8-bit via bitsandbytes, "
        "fp16, the serving engine on CUDA); CI has no GPU",
        allow_module_level=True,
    )


def _bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot be used here, or None when it imports."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        return f"bitsandbytes is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


_BNB_PROBLEM = _bitsandbytes_problem()
needs_bnb = pytest.mark.skipif(
    _BNB_PROBLEM is not None, reason=f"{_BNB_PROBLEM}; 8/4-bit loading needs it: pip install -e '.[qlora]'"
)

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = [
    "Who are you?",
    "What is the capital of France?",
    "Name an animal.",
    "Say something.",
    "What is 1 2 3?",
    "Describe the dog.",
    "Which task?",
    "Write a response.",
    "What is the input?",
    "Complete it.",
    "Who is quick?",
    "Where is France?",
    "Who is lazy?",
    "Say a number.",
    "What jumps over the dog?",
    "Tell me the capital.",
]
PROMPTS = [
    "Who is the assistant?",
    "What jumps over the dog?",
    "Tell me the capital of France.",
    "Describe a task.",
    "What are you?",
    "Write an instruction.",
    "Say a number.",
    "Who is lazy?",
]


# ---- models and data -------------------------------------------------------------------------


def build_llama(
    folder: Path, tokenizer_dir: Path, hidden: int, intermediate: int, heads: int, kv_heads: int, seed: int = 0
) -> Path:
    """A 2-layer random Llama of the given width, with the tokenizer of ``tokenizer_dir``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Hidden 256, head dim 64: the shapes real models have in bitsandbytes' eyes (multiples of 64)."""
    return build_llama(
        tmp_path_factory.mktemp("wide-llama"), tiny_model_dir, hidden=256, intermediate=512, heads=4, kv_heads=2
    )


@pytest.fixture(scope="module")
def models(tiny_model_dir, wide_model_dir) -> dict[str, Path]:
    return {"tiny64": tiny_model_dir, "wide256": wide_model_dir}


@pytest.fixture(scope="module")
def alpaca_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpu-data") / "alpaca.json"
    path.write_text(
        json.dumps([{"instruction": q, "input": "", "output": "The quick brown fox."} for q in QUESTIONS]),
        encoding="utf-8",
    )
    return path


def train_cfg(model_dir: Path, data: Path, out: Path, **kw):
    from lorakit.config import TrainConfig

    base = dict(
        base_model=str(model_dir),
        data_path=str(data),
        output_dir=str(out),
        batch_size=4,
        micro_batch_size=4,
        max_steps=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules=MODULES,
        val_set_size=0,
        logging_steps=1,
        save_steps=1000,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def run_training(cfg) -> tuple[dict, float, float]:
    """Train through lorakit's recipe; returns (manifest, peak GPU MiB, wall seconds)."""
    from lorakit.train.recipe import train

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    manifest = train(cfg)
    torch.cuda.synchronize()
    return manifest, torch.cuda.max_memory_allocated() / 2**20, time.perf_counter() - t0


def check_trained_adapter(out: Path, manifest: dict, steps: int, precision: str) -> list[float]:
    """The saved, verified adapter: files in place, manifest verification, finite losses. Returns the losses."""
    from safetensors.torch import load_file

    from lorakit.train.callbacks import read_train_log

    for name in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "manifest.json",
        "lorakit_template.json",
        "train_log.jsonl",
    ]:
        assert (out / name).is_file(), name
    saved = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(manifest))
    assert saved["precision"] == precision
    assert saved["training"]["global_steps"] == steps
    assert saved["training"]["peak_memory_kind"] == "cuda_allocated"
    check = saved["verification"]
    assert check["tensors"] == 2 * len(MODULES) * 2  # 2 layers x modules x (A, B)
    assert check["max_logit_diff"] is not None and check["max_logit_diff"] <= 1e-4, check
    assert math.isfinite(saved["training"]["train_loss"]), saved["training"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert any(float(t.abs().max()) > 0 for n, t in weights.items() if "lora_B" in n)
    assert not list(out.glob(".saving-*"))
    losses = [r["loss"] for r in read_train_log(out) if "loss" in r]
    assert len(losses) == steps, losses
    assert all(isinstance(x, float) and math.isfinite(x) for x in losses), losses
    return losses


def report(name: str, **values) -> None:
    parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"\nGPU-RESULT {name} {parts}", flush=True)


def generate_on_quantized_base(model_dir: Path, adapter: Path, *, load_in_4bit: bool, load_in_8bit: bool):
    """lorakit's Generator on a bitsandbytes base with the adapter loaded by lorakit's load_adapter.

    Generator itself only loads full-precision bases (there is no quantized option), so the model is
    built here with lorakit's own load_model + quantization_config and handed to the Generator."""
    from lorakit.data.templates import template_for_folder
    from lorakit.infer.adapters import check_adapter_dir, load_adapter
    from lorakit.infer.generate import DEFAULT_ADAPTER_NAME, GenerationParams, Generator
    from lorakit.models.loading import load_model, load_tokenizer, quantization_config

    qconfig = quantization_config(load_in_8bit, load_in_4bit, torch.bfloat16)
    base = load_model(
        str(model_dir),
        dtype=torch.bfloat16,
        load_in_8bit=load_in_8bit,
        load_in_4bit=load_in_4bit,
        bnb_config=qconfig,
        device_map={"": 0},
    )
    quantized = [m for m in base.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert len(quantized) == 2 * len(MODULES), "the base was not quantized"
    model = load_adapter(base, adapter, DEFAULT_ADAPTER_NAME)
    gen = Generator.__new__(Generator)
    gen.adapter_dir, gen.base = check_adapter_dir(adapter), str(model_dir)
    gen.tokenizer, gen.model = load_tokenizer(str(model_dir)), model
    gen.template = template_for_folder(adapter)
    assert gen.device.type == "cuda"
    params = GenerationParams(max_new_tokens=12)
    with_adapter = gen.generate("Who are you?", params=params)
    without = gen.generate("Who are you?", params=params, use_adapter=False)
    batch = gen.generate_batch(PROMPTS[:4], params=params)
    assert len(batch) == 4 and all(isinstance(a, str) for a in batch)
    # the adapter really acts on the quantized base: its logits differ from the base's
    ids = torch.tensor([gen.prompt_ids("Who are you?")], device="cuda")
    with torch.no_grad():
        on = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            off = model(input_ids=ids).logits.float()
    assert torch.isfinite(on).all() and torch.isfinite(off).all()
    assert float((on - off).abs().max()) > 1e-3
    return with_adapter, without


# ---- 1. QLoRA 4-bit and 2. 8-bit -------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize(
    "model_key,gradient_checkpointing",
    [("tiny64", False), ("wide256", False), ("wide256", True)],
    ids=["tiny64", "wide256", "wide256-gradckpt"],
)
def test_qlora_4bit_trains_saves_verified_and_generates(
    models, alpaca_json, tmp_path, model_key, gradient_checkpointing
):
    """nf4 + double quantization + bf16 compute, paged 8-bit AdamW, through the recipe."""
    out = tmp_path / "qlora"
    cfg = train_cfg(
        models[model_key],
        alpaca_json,
        out,
        load_in_4bit=True,
        precision="bf16",
        gradient_checkpointing=gradient_checkpointing,
        max_steps=10,
        save_steps=5,
    )
    manifest, peak, wall = run_training(cfg)
    losses = check_trained_adapter(out, manifest, steps=10, precision="bf16")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    # the 4-bit settings lorakit promises
    from lorakit.models.loading import quantization_config

    q = quantization_config(False, True, torch.bfloat16)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (
        True,
        "nf4",
        True,
        torch.bfloat16,
    )
    answer, base_answer = generate_on_quantized_base(models[model_key], out, load_in_4bit=True, load_in_8bit=False)
    report(
        f"qlora4bit[{model_key}{'-gradckpt' if gradient_checkpointing else ''}]",
        peak_gpu_mib=peak,
        manifest_peak_mib=float(manifest["training"]["peak_memory_mib"]),
        train_s=wall,
        first_loss=losses[0],
        last_loss=losses[-1],
        train_loss=float(manifest["training"]["train_loss"]),
        max_logit_diff=float(manifest["verification"]["max_logit_diff"]),
        answer=json.dumps(answer),
        base_answer=json.dumps(base_answer),
    )


@needs_bnb
def test_qlora_4bit_resumes_from_a_checkpoint(wide_model_dir, alpaca_json, tmp_path):
    """A QLoRA run's checkpoint (paged 8-bit optimizer state included) resumes and ends verified."""
    out = tmp_path / "resume"
    run_training(
        train_cfg(wide_model_dir, alpaca_json, out, load_in_4bit=True, precision="bf16", max_steps=4, save_steps=2)
    )
    manifest, peak, wall = run_training(
        train_cfg(
            wide_model_dir,
            alpaca_json,
            out,
            load_in_4bit=True,
            precision="bf16",
            max_steps=6,
            save_steps=2,
            resume_from_checkpoint=True,
        )
    )
    assert manifest["training"]["resumed_from"].endswith("checkpoint-4")
    check_trained_adapter(out, manifest, steps=6, precision="bf16")
    report(
        "qlora4bit-resume[wide256]",
        peak_gpu_mib=peak,
        train_s=wall,
        train_loss=float(manifest["training"]["train_loss"]),
    )


@needs_bnb
@pytest.mark.parametrize("model_key", ["tiny64", "wide256"])
def test_8bit_trains_saves_verified_and_generates(models, alpaca_json, tmp_path, model_key):
    out = tmp_path / "int8"
    cfg = train_cfg(models[model_key], alpaca_json, out, load_in_8bit=True, precision="bf16", max_steps=4)
    manifest, peak, wall = run_training(cfg)
    losses = check_trained_adapter(out, manifest, steps=4, precision="bf16")
    answer, base_answer = generate_on_quantized_base(models[model_key], out, load_in_4bit=False, load_in_8bit=True)
    report(
        f"8bit[{model_key}]",
        peak_gpu_mib=peak,
        train_s=wall,
        first_loss=losses[0],
        last_loss=losses[-1],
        train_loss=float(manifest["training"]["train_loss"]),
        max_logit_diff=float(manifest["verification"]["max_logit_diff"]),
        answer=json.dumps(answer),
        base_answer=json.dumps(base_answer),
    )


# ---- 3. fp16 / bf16 on the GPU, not quantized --------------------------------------------------


@pytest.mark.parametrize(
    "precision,gradient_checkpointing",
    [("fp16", False), ("bf16", False), ("bf16", True)],
    ids=["fp16", "bf16", "bf16-gradckpt"],
)
def test_half_precision_training_on_gpu(tiny_model_dir, alpaca_json, tmp_path, precision, gradient_checkpointing):
    out = tmp_path / precision
    cfg = train_cfg(
        tiny_model_dir,
        alpaca_json,
        out,
        precision=precision,
        max_steps=6,
        gradient_checkpointing=gradient_checkpointing,
    )
    manifest, peak, wall = run_training(cfg)
    losses = check_trained_adapter(out, manifest, steps=6, precision=precision)
    assert peak > 0  # the model trained on the GPU
    # the adapter loads and generates through lorakit's Generator (which loads the base itself)
    from lorakit.infer.generate import GenerationParams, Generator

    gen = Generator(adapter=str(out))
    answer = gen.generate("Who are you?", params=GenerationParams(max_new_tokens=8))
    assert isinstance(answer, str)
    assert gen.device.type == "cuda"  # generate/chat/eval use the GPU when there is one
    report(
        f"train[{precision}{'-gradckpt' if gradient_checkpointing else ''}]",
        peak_gpu_mib=peak,
        train_s=wall,
        first_loss=losses[0],
        last_loss=losses[-1],
        train_loss=float(manifest["training"]["train_loss"]),
        max_logit_diff=float(manifest["verification"]["max_logit_diff"]),
        generator_device=str(gen.device),
        answer=json.dumps(answer),
    )


def test_auto_precision_on_gpu_is_bf16_or_fp16():
    from lorakit.models.loading import resolve_precision

    assert resolve_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert resolve_precision("fp16") == "fp16"


# ---- 4. the serving engine on the GPU ---------------------------------------------------------


@pytest.fixture(scope="module")
def random_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    from random_adapter import make_random_adapter

    root = tmp_path_factory.mktemp("gpu-adapters")
    return {
        name: make_random_adapter(tiny_model_dir, root / name, seed=seed) for name, seed in (("one", 1), ("two", 2))
    }


def _engine(model_dir: Path, adapters: dict[str, Path], dtype: str):
    from lorakit.serve.engine import Engine

    engine = Engine(str(model_dir), base_name="base", dtype=dtype, max_batch_size=8, max_queue=64)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    return engine


def _batched_vs_solo(engine, max_tokens: int = 16):
    """24 requests (8 prompts x base and 2 adapters): answers alone, then all submitted at once."""
    from lorakit.serve.engine import Request

    def ask(model, prompt):
        return Request(
            prompt_ids=engine.chat_prompt_ids(model, [("user", prompt)]),
            model=model,
            adapter=None,
            max_tokens=max_tokens,
        )

    def wait(reqs):
        for r in reqs:
            assert r.done.wait(120), "a request never finished"
            assert r.finish_reason in ("stop", "length"), (r.finish_reason, r.error)
        return reqs

    jobs = [(m, p) for p in PROMPTS for m in ("base", "one", "two")]
    solo = {job: wait([engine.submit(ask(*job))])[0].ids for job in jobs}
    sizes = []
    original = engine._decode

    def counting(batch):
        sizes.append(len(batch.rows))
        return original(batch)

    engine._decode = counting
    try:
        t0 = time.perf_counter()
        batched = wait([engine.submit(ask(*job)) for job in jobs])
        batch_s = time.perf_counter() - t0
    finally:
        engine._decode = original
    return jobs, solo, batched, sizes, batch_s


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_batched_greedy_equals_solo_on_gpu(tiny_model_dir, random_adapters, dtype):
    """Continuous batching on CUDA: rows for the base and 2 adapters share steps (peft's per-row
    adapter_names) and each greedy answer is the one it gets alone. float32 must match exactly.
    bfloat16 (the engine's default on CUDA) is not batch-invariant: a row's rounding depends on the
    batch's shape (left padding, kernel choice), so a near-tie can flip a greedy token a few tokens in
    (it does on CPU too: 3 of these 24 answers diverge after 1-7 tokens). There most answers must
    match, and the count is printed."""
    torch.cuda.reset_peak_memory_stats()
    engine = _engine(tiny_model_dir, random_adapters, dtype)
    try:
        assert engine.device.type == "cuda"
        assert next(engine.model.parameters()).device.type == "cuda"
        assert next(engine.model.parameters()).dtype == getattr(torch, dtype)
        jobs, solo, batched, sizes, batch_s = _batched_vs_solo(engine)
    finally:
        engine.shutdown()
    same = [solo[job] == r.ids for job, r in zip(jobs, batched)]
    diverge_at = [
        next((i for i, (a, b) in enumerate(zip(solo[job], r.ids)) if a != b), min(len(solo[job]), len(r.ids)))
        for job, r in zip(jobs, batched)
        if solo[job] != r.ids
    ]
    report(
        f"engine[{dtype}]",
        requests=len(jobs),
        identical=sum(same),
        max_batch=max(sizes),
        batched_s=batch_s,
        peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20,
        differing=json.dumps([f"{m}:{p}" for (m, p), s in zip(jobs, same) if not s]),
        diverge_at_token=json.dumps(diverge_at),
    )
    assert max(sizes) == 8  # they really shared steps
    # the adapters change the answers (else the test would prove nothing about per-row adapters)
    for name in ("one", "two"):
        assert any(solo[(name, p)] != solo[("base", p)] for p in PROMPTS), name
    if dtype == "float32":
        assert all(same), f"{len(same) - sum(same)} of {len(same)} batched answers differ from their solo answers"
    else:
        assert sum(same) >= len(same) // 2, f"only {sum(same)} of {len(same)} batched answers equal their solo answers"


def test_openai_api_on_gpu_engine(tiny_model_dir, random_adapters):
    """The FastAPI app over a CUDA engine: 8 concurrent greedy chat completions over the base and both
    adapters answer as the engine does alone."""
    pytest.importorskip(
        "fastapi", reason="fastapi is not installed (pip install -e '.[serve]'); the Engine itself is tested above"
    )
    import httpx

    from lorakit.serve.app import create_app
    from lorakit.serve.engine import Request

    engine = _engine(tiny_model_dir, random_adapters, "float32")
    try:
        app = create_app(engine)
        jobs = [(("base", "one", "two")[i % 3], PROMPTS[i]) for i in range(8)]
        solo = []
        for model, prompt in jobs:
            r = engine.submit(
                Request(
                    prompt_ids=engine.chat_prompt_ids(model, [("user", prompt)]),
                    model=model,
                    adapter=None,
                    max_tokens=12,
                )
            )
            assert r.done.wait(120)
            solo.append(r.text.strip())

        async def ask_all():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gpu", timeout=120) as client:
                health = await client.get("/health")
                assert health.status_code == 200
                return await asyncio.gather(
                    *[
                        client.post(
                            "/v1/chat/completions",
                            json={
                                "model": model,
                                "max_tokens": 12,
                                "temperature": 0,
                                "messages": [{"role": "user", "content": prompt}],
                            },
                        )
                        for model, prompt in jobs
                    ]
                )

        responses = asyncio.run(ask_all())
    finally:
        engine.shutdown()
    for (model, prompt), resp, want in zip(jobs, responses, solo):
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == want, (model, prompt)
    report("openai-api[float32]", requests=len(jobs), all_equal_solo=True)
