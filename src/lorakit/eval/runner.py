"""`lorakit eval`: the base model and each adapter, on each eval set, measured the same way.

One copy of the base model is loaded; adapters are loaded onto it by name and switched, and the
base runs with the adapters disabled. Every model uses the same prompt template (the one given,
else the first adapter's recorded one, else alpaca), so differences come from the weights.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..console import info
from ..data.loader import load_examples
from ..data.tokenize import ExampleTokenizer
from ..errors import LorakitError
from ..infer.adapters import adapter_param_count, adapter_weights_file, check_adapter_dir, load_adapter
from ..infer.generate import GenerationParams, Generator
from ..runfolder import read_train_log
from .metrics import METRICS, score_all
from .report import write_report

SAMPLES_PER_SET = 5


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _peak_memory_mib(device: torch.device | None = None) -> float:
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _adapter_names(adapters: list[Path]) -> list[str]:
    names: list[str] = []
    for path in adapters:
        name = path.resolve().name or "adapter"
        while name in names or name in ("base", "default"):  # "default" is the first adapter's peft name
            name += "_"
        names.append(name)
    return names


@torch.no_grad()
def reference_loss(gen: Generator, examples, cutoff_len: int, batch_size: int) -> float:
    """Mean loss of the reference answers (prompt masked), teacher-forced."""
    from transformers import DataCollatorForSeq2Seq

    encode = ExampleTokenizer(gen.tokenizer, gen.template, cutoff_len)
    feats = [f for f in (encode(e) for e in examples) if f is not None]
    collate = DataCollatorForSeq2Seq(gen.tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    total, count = 0.0, 0
    for start in range(0, len(feats), batch_size):
        batch = {k: v.to(gen.device) for k, v in collate(feats[start : start + batch_size]).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(gen.model(**batch).loss) * n
        count += n
    return total / max(count, 1)


def evaluate(
    base: str | None,
    adapters: list[str],
    data_paths: list[str],
    out: str | Path,
    metrics: list[str] | None = None,
    limit: int | None = None,
    template: str | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    cutoff_len: int = 1024,
    samples_per_set: int = SAMPLES_PER_SET,
) -> dict:
    metrics = metrics or list(METRICS)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise LorakitError(f"--metrics: unknown {', '.join(unknown)}; known: {', '.join(METRICS)}")
    if limit is not None and limit < 1:
        raise LorakitError("--limit: must be at least 1")
    adapter_dirs = [check_adapter_dir(a) for a in adapters]
    sets = []
    for path in data_paths:  # bad data fails before any model is loaded
        data = load_examples(path)
        examples = [e for e in data.examples if e.turns][:limit] if limit else [e for e in data.examples if e.turns]
        if not examples:
            raise LorakitError(
                f"{path}: no instruction/answer examples to evaluate (plain text records have no answer)"
            )
        sets.append((Path(path).stem, Path(path), examples))

    gen = Generator(base=base, adapter=str(adapter_dirs[0]) if adapter_dirs else None, template=template)
    names = _adapter_names(adapter_dirs)
    if adapter_dirs:
        # the first adapter is loaded as "default" by the Generator; the others get their own names
        # (float or int8 folders alike)
        for name, path in zip(names[1:], adapter_dirs[1:]):
            gen.model = load_adapter(gen.model, path, name)
    models = [{"name": "base", "adapter": None, "adapter_size_bytes": None, "trainable_params": None, "train_log": []}]
    for name, path in zip(names, adapter_dirs):
        weights = adapter_weights_file(path)  # adapter_model.safetensors, or the int8 file
        n_params = adapter_param_count(path)
        models.append(
            {
                "name": name,
                "adapter": str(path.resolve()),
                "adapter_size_bytes": weights.stat().st_size,
                "trainable_params": int(n_params),
                "train_log": read_train_log(path),
            }
        )

    params = GenerationParams(max_new_tokens=max_new_tokens)
    scores: dict[str, dict] = {}
    samples: dict[str, list] = {
        name: [
            {"prompt": e.instruction + (f"\n\n{e.input}" if e.input else ""), "reference": e.output, "answers": {}}
            for e in ex[:samples_per_set]
        ]
        for name, _, ex in sets
    }
    for i, model in enumerate(models):
        use_adapter = model["adapter"] is not None
        if use_adapter:
            gen.model.set_adapter("default" if i == 1 else model["name"])
        scores[model["name"]] = {}
        for set_name, _, examples in sets:
            info(f"eval: {model['name']} on {set_name} ({len(examples)} examples)")
            predictions, latencies, new_tokens, t_total = [], [], 0, 0.0
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                t0 = time.perf_counter()
                predictions += gen.generate_batch(
                    [e.instruction for e in chunk],
                    [e.input for e in chunk],
                    params=params,
                    use_adapter=use_adapter,
                    batch_size=batch_size,
                )
                took = time.perf_counter() - t0
                t_total += took
                new_tokens += sum(gen.last_new_tokens)
                latencies += [took / len(chunk)] * len(chunk)  # batched: each answer's share of the batch time
            with gen._adapter_context(use_adapter):
                loss = reference_loss(gen, examples, cutoff_len, batch_size)
            row = score_all(predictions, [e.output for e in examples], metrics)
            row.update(
                {
                    "loss": loss,
                    "perplexity": math.exp(min(loss, 50)),
                    "latency_p50_s": statistics.median(latencies),
                    "latency_p95_s": _percentile(latencies, 95),
                    "tokens_per_s": new_tokens / t_total if t_total else None,
                    "peak_memory_mib": _peak_memory_mib(gen.device),
                }
            )  # process peak so far
            scores[model["name"]][set_name] = row
            for sample, answer in zip(samples[set_name], predictions):
                sample["answers"][model["name"]] = answer

    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": gen.base,
        "template": gen.template.name,
        "generation": {"max_new_tokens": max_new_tokens, "greedy": True, "batch_size": batch_size},
        "models": models,
        "datasets": [{"name": n, "path": str(p), "examples": len(e)} for n, p, e in sets],
        "scores": scores,
        "samples": samples,
    }
    write_report(result, Path(out))
    return result
