"""Export verification: one prompt set, one reference, one set of figures and one rule for every format.

An export (``hf``, ``gguf`` at any quant, ``gguf-lora``, ``ollama``) is compared with lorakit's OWN
answers: the base + adapter, unmerged, run by lorakit's Generator.

- The prompts (``verification_set``): ``--verify-data FILE``; else the adapter's validation examples
  (its run's ``val_set_size`` split of ``data_path``, re-made with the run's seed, or its
  ``eval_data_path``); else the first training prompts of ``data_path``; else a fixed list (said so).
  At most ``VERIFY_PROMPTS``.
- The reference (``lorakit_reference``): lorakit's greedy answer to each prompt, its token ids (up to
  and including the stop token, so where the answer ends is checked too), and lorakit's log-probs at
  each of those positions (teacher forced).
- The figures (``compare``): greedy answers identical (count of N); top-1 agreement: the share of
  the reference's answer tokens the export also ranks first when it reads lorakit's prompt + answer;
  mean KL(lorakit || export) of the next-token distributions over the same positions.
- The rule (``gate``, ``THRESHOLDS``): ``hf``, ``f32``, ``f16``, ``bf16`` (and a GGUF LoRA, f16): greedy
  identical on >= 95% and top-1 >= 99%; ``q8_0``: top-1 >= 97%; k-quants: reported, failing only
  below ``--min-top1`` when the user sets it (which also overrides the top-1 rule of any format).

A failed check raises VerificationFailed with its figures; the export keeps the artifact, marked
unverified (export.json ``"verified": false``, ``UNVERIFIED`` in the file name / a marker file),
and the command exits 1.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.records import Turn
from ..errors import LorakitError

VERIFY_PROMPTS = 32  # at most this many prompts are compared
VERIFY_NEW_TOKENS = 32  # greedy tokens per answer

# format or quant -> (min share of identical greedy answers, min top-1 agreement); None: not a rule
THRESHOLDS: dict[str, tuple[float | None, float | None]] = {
    "hf": (0.95, 0.99),
    "f32": (0.95, 0.99),
    "f16": (0.95, 0.99),
    "bf16": (0.95, 0.99),
    "q8_0": (None, 0.97),
    "q4_k_m": (None, None),
    "q5_k_m": (None, None),
    "q6_k": (None, None),
    "vllm": (0.90, None),  # vLLM's answers through its chat endpoint (no full distributions: top-1 reported)
}

# a format with no top-1 rule (k-quants) below this top-1 agreement passes with a warning
WARN_TOP1 = 0.95

FIXED_PROMPTS = [  # (instruction, input) when nothing of the adapter's data can be read
    ("What is the capital of France?", ""),
    ("Who are you?", ""),
    ("Write one sentence about the sea.", ""),
    ("Translate to French.", "The quick brown fox jumps over the lazy dog."),
    ("你好，世界。请介绍一下你自己。", ""),
    ("List three colours.", ""),
    ("Summarise the text.", "1 2 3 4 5 6 7 8 9 0"),
    ("What is 2 plus 2?", ""),
]


class VerificationFailed(LorakitError):
    """An export that did not pass its verification; ``figures`` says by how much, ``record`` is the
    export's record once the artifact was kept (marked unverified)."""

    exit_code = 1

    def __init__(self, message: str, figures: dict | None = None, record: dict | None = None, reason: str = ""):
        super().__init__(message)
        self.figures = figures or {}
        self.record = record
        self.reason = reason or message  # what failed, without where the artifact was kept


@dataclass(frozen=True)
class Conversation:
    """One prompt in lorakit's terms (what prompt_ids_for takes)."""

    instruction: str
    input: str = ""
    history: tuple[Turn, ...] = ()
    system: str = ""
    output: str = ""  # the data's own answer, when the prompt came from data (for reference_nll)


@dataclass
class VerifySet:
    prompts: list[Conversation]
    source: str


# ---- the prompts -------------------------------------------------------------------------------


def _conversations(examples) -> list[Conversation]:
    """Instruction examples as prompts: the last user turn, with the turns before it as history."""
    found = []
    for e in examples:
        if e.text is not None or not e.turns:
            continue
        turns = list(e.turns)
        output = turns.pop().content if turns[-1].role == "assistant" else ""
        while turns and turns[-1].role != "user":
            turns.pop()
        if not turns or not turns[-1].content:
            continue
        history = tuple(turns[:-1])
        found.append(
            Conversation(
                turns[-1].content, input="" if history else e.input, history=history, system=e.system, output=output
            )
        )
    return found


def verification_set(adapter_dir: Path, data: str | Path | None = None, n: int = VERIFY_PROMPTS) -> VerifySet:
    """The prompts an export is verified on (see the module docstring for the order)."""
    from ..config import split_validation, val_count
    from ..data.loader import load_examples
    from ..runfolder import read_config_record, recorded_path, run_of

    if n < 1:
        raise LorakitError(f"--verify-prompts: {n}; must be at least 1")
    if data is not None:
        prompts = _conversations(load_examples(data).examples)  # a bad file: its DataError line
        if not prompts:
            raise LorakitError(f"--verify-data: {data} has no instruction records (a user turn to answer)")
        return VerifySet(prompts[:n], f"--verify-data {data}")
    run = run_of(adapter_dir)
    config = read_config_record(adapter_dir) or read_config_record(run) or {}  # a checkpoint's own first
    data_path = str(recorded_path(run, config["data_path"], config)) if config.get("data_path") else None
    train = None
    if data_path:
        try:
            train = load_examples(
                data_path, None if config.get("data_format") in (None, "auto") else config["data_format"]
            )
        except LorakitError:
            train = None
    if train is not None and config.get("val_set_size"):
        n_val = val_count(float(config["val_set_size"]), len(train.examples))
        if 0 < n_val < len(train.examples):
            val, _ = split_validation(train.examples, n_val, int(config.get("seed", 42)))
            prompts = _conversations(val)
            if prompts:
                return VerifySet(
                    prompts[:n], f"validation split of {data_path} (val_set_size {config['val_set_size']})"
                )
    paths = config.get("eval_data_path") or []
    for path in [paths] if isinstance(paths, str) else list(paths):
        path = recorded_path(run, str(path), config)
        try:
            prompts = _conversations(load_examples(path).examples)
        except LorakitError:
            continue
        if prompts:
            return VerifySet(prompts[:n], f"eval data {path}")
    if train is not None:
        prompts = _conversations(train.examples)
        if prompts:
            return VerifySet(prompts[:n], f"first training prompts of {data_path}")
    fixed = [Conversation(q, input=i) for q, i in FIXED_PROMPTS]
    return VerifySet(fixed[:n], "fixed prompts (the adapter's data could not be read)")


# ---- the reference -----------------------------------------------------------------------------


@dataclass
class Reference:
    """lorakit's own answers (base + adapter) to a VerifySet."""

    vset: VerifySet
    prompt_ids: list[list[int]]
    answers: list[str]
    answer_ids: list[list[int]]  # greedy tokens, up to and including a stop token
    logprobs: list[Any]  # per prompt: a float32 tensor [len(answer_ids), vocab]
    tokens_per_s: float
    template: Any
    tokenizer: Any
    label: str
    new_tokens: int
    extra: dict = field(default_factory=dict)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cut_at_stop_id(ids: list[int], stop_ids) -> list[int]:
    """The greedy tokens up to and including the first stop id."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1]
    return ids


def lorakit_reference(
    adapter_dir: Path,
    base: str,
    vset: VerifySet,
    new_tokens: int = VERIFY_NEW_TOKENS,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
    base_weights: dict | None = None,
) -> Reference:
    """lorakit's Generator (base + adapter, unmerged, ``dtype``): greedy answers and their log-probs.
    ``base_weights``: a QLoRA adapter's 4-bit settings, to run it on the de-quantized base it trained on."""
    import torch

    from .generate import GenerationParams, Generator, answer_text, generate_kwargs
    from .merge import DTYPES

    prepare = None
    if base_weights:
        from .qlora_base import dequantize_like_training

        def prepare(model):
            dequantize_like_training(model, base_weights)

    gen = Generator(
        base=base,
        adapter=str(adapter_dir),
        dtype=DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        prepare_base=prepare,
    )
    params = GenerationParams(max_new_tokens=new_tokens)
    stop_ids = set(gen.stops.eos_ids(gen.tokenizer))
    prompt_ids, answers, answer_ids, logprobs = [], [], [], []
    generated, seconds = 0, 0.0
    with torch.no_grad():
        for c in vset.prompts:
            ids = gen.prompt_ids(c.instruction, c.input, list(c.history), c.system)
            x = torch.tensor([ids], device=gen.device)
            start = time.perf_counter()
            out = gen.model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), **generate_kwargs(params, gen.tokenizer, gen.stops)
            )
            seconds += time.perf_counter() - start
            new = out[0, len(ids) :].tolist()
            generated += len(new)
            answers.append(answer_text(gen.tokenizer, new, gen.stops))
            stream = cut_at_stop_id(new, stop_ids)
            prompt_ids.append(ids)
            answer_ids.append(stream)
            logprobs.append(teacher_forced_logprobs(gen.model, ids, stream))
    template, tokenizer = gen.template, gen.tokenizer
    del gen
    free_memory()
    return Reference(
        vset=vset,
        prompt_ids=prompt_ids,
        answers=answers,
        answer_ids=answer_ids,
        logprobs=logprobs,
        tokens_per_s=generated / seconds if seconds > 0 else 0.0,
        template=template,
        tokenizer=tokenizer,
        label=f"lorakit Generator, {'de-quantized 4-bit ' if base_weights else ''}base + adapter (unmerged), {dtype}",
        new_tokens=new_tokens,
    )


def reference_for(
    reference: Reference | None,
    adapter_dir: Path,
    base: str,
    vset: VerifySet | None,
    new_tokens: int = VERIFY_NEW_TOKENS,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
    base_weights: dict | None = None,
) -> Reference:
    """``reference`` when one is given (the bench shares one across formats), else lorakit's, made
    on ``vset`` (default: verification_set's)."""
    if reference is not None:
        return reference
    vset = vset or verification_set(adapter_dir)
    return lorakit_reference(adapter_dir, base, vset, new_tokens, dtype, trust_remote_code, base_weights)


def teacher_forced_logprobs(model, prompt: list[int], answer: list[int]):
    """log-softmax of a transformers model's next-token logits at each answer position: row i
    predicts answer[i] after prompt + answer[:i]. float32, on the CPU."""
    import torch

    if not answer:
        return torch.zeros((0, 1))
    device = next(model.parameters()).device
    x = torch.tensor([prompt + answer[:-1]], device=device)
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, len(prompt) - 1 :]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def reference_nll(model, tokenizer, template, vset: VerifySet) -> tuple[float | None, int]:
    """Mean negative log-likelihood per token of the data's own answers (``Conversation.output``,
    then EOS) after lorakit's prompt, teacher forced: (mean NLL or None without answers, tokens)."""
    import torch

    from .generate import prompt_ids_for

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for c in vset.prompts:
            if not c.output:
                continue
            prompt = prompt_ids_for(template, tokenizer, c.instruction, c.input, list(c.history), c.system)
            answer = tokenizer(c.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            x = torch.tensor([prompt + answer], device=device)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, len(prompt) - 1 : -1]
            target = torch.tensor(answer, device=device)
            total += float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
            count += len(answer)
    return (total / count if count else None), count


# ---- the figures -------------------------------------------------------------------------------


def compare(reference: Reference, answers: list[str], logits: list[Any], tokens_per_s: float | None = None) -> dict:
    """The figures of an export against the reference: ``answers`` are its greedy answers (text),
    ``logits`` its next-token logits (or log-probs) at the reference's answer positions."""
    import torch

    same = sum(a == b for a, b in zip(reference.answers, answers))
    agree = total = 0
    kl_sum = 0.0
    kl_max = 0.0
    for ref, got, ids in zip(reference.logprobs, logits, reference.answer_ids):
        if not ids:
            continue
        got = torch.as_tensor(got, dtype=torch.float32)
        vocab = min(ref.shape[-1], got.shape[-1])  # a padded vocab (GGUF) has no mass beyond the tokenizer's
        p_log = ref[:, :vocab]
        q_log = torch.log_softmax(got[: len(ids), :vocab], dim=-1)
        agree += int((q_log.argmax(-1) == torch.tensor(ids)).sum())
        total += len(ids)
        p = p_log.exp()  # a token lorakit gives probability 0 adds 0 (not 0 * -inf)
        kl = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1).clamp_min(0.0)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
    n = len(reference.answers)
    figures = {
        "prompts": n,
        "prompts_source": reference.vset.source,
        "max_new_tokens": reference.new_tokens,
        "greedy_identical": same,
        "greedy_identical_share": round(same / n, 4) if n else None,
        "top1_agreement": round(agree / total, 4) if total else 1.0,
        "top1_matches": agree,
        "mean_kl": round(kl_sum / total, 6) if total else 0.0,
        "max_kl": round(kl_max, 6),
        "tokens_compared": total,
        "reference": reference.label,
        "reference_tokens_per_s": round(reference.tokens_per_s, 1),
        "differences": [
            {"prompt": p.instruction[:80], "lorakit": a, "export": b}
            for p, a, b in zip(reference.vset.prompts, reference.answers, answers)
            if a != b
        ][:8],
    }
    if tokens_per_s is not None:
        figures["tokens_per_s"] = round(tokens_per_s, 1)
    return figures


def gate(figures: dict, kind: str, min_top1: float | None = None) -> dict:
    """Apply the rule for ``kind`` (a format or quant); adds the thresholds and ``passed`` to
    ``figures`` and returns them; raises VerificationFailed when the export is below them."""
    min_identical, top1_rule = THRESHOLDS.get(kind, (0.95, 0.99))
    if min_top1 is not None:
        if not 0.0 <= min_top1 <= 1.0:
            raise LorakitError(f"--min-top1: {min_top1}; must be between 0 and 1")
        top1_rule = min_top1
    figures["min_greedy_identical_share"] = min_identical
    figures["min_top1_agreement"] = top1_rule
    failures = []
    # the rule is applied to the exact ratios, not to the rounded figures shown
    n, total = figures.get("prompts") or 0, figures.get("tokens_compared") or 0
    share = figures["greedy_identical"] / n if n else None
    top1 = figures["top1_matches"] / total if total and "top1_matches" in figures else figures["top1_agreement"]
    if min_identical is not None and share is not None and share < min_identical:
        failures.append(
            f"greedy answers identical {figures['greedy_identical']}/{figures['prompts']} (below {min_identical:.0%})"
        )
    if top1_rule is not None and top1 < top1_rule:
        failures.append(
            f"top-1 agreement {figures['top1_agreement']:.2%} of {figures['tokens_compared']} tokens "
            f"(below {top1_rule:.0%})"
        )
    figures["passed"] = not failures
    kl = f"mean KL {figures['mean_kl']:.3g}, " if figures.get("mean_kl") is not None else ""
    if top1_rule is None and top1 < WARN_TOP1:
        figures["warning"] = (
            f"{kind} changes {1 - figures['top1_agreement']:.1%} of lorakit's next tokens ({kl}"
            f"greedy answers identical {figures['greedy_identical']}/{figures['prompts']}): "
            "try it on your own prompts before deploying it"
            + (", or choose q8_0 / q6_k" if kind in THRESHOLDS and kind.startswith("q") else "")
        )
    if failures:
        if kl:
            failures.append(kl.rstrip(", "))
        raise VerificationFailed(f"verification failed ({kind}): {'; '.join(failures)}", figures)
    return figures


def describe(figures: dict | None) -> str:
    """One line of figures for a summary."""
    if not figures:
        return "not verified"
    if "top1_agreement" not in figures:
        return figures.get("error", "not verified")
    speed = f", {figures['tokens_per_s']} tokens/s" if figures.get("tokens_per_s") is not None else ""
    return (
        f"greedy answers identical {figures['greedy_identical']}/{figures['prompts']}, "
        f"top-1 agreement {figures['top1_agreement']:.2%} of {figures['tokens_compared']} tokens, "
        f"mean KL {figures['mean_kl']:.2g}{speed} ({figures['prompts_source']})"
    )
