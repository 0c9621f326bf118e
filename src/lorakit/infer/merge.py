"""Merge an adapter into its base: a standalone model folder that plain
``AutoModelForCausalLM.from_pretrained`` loads (safetensors + tokenizer + the template record).

The merged folder always records the template the adapter was trained with (the template
policy's answer for the adapter, also for a checkpoint or a plain peft adapter), so prompting the
merged model gives the same prompt as base + adapter did.

``lorakit merge`` and ``lorakit export --to hf`` share the steps below: ``check_merge_args``,
``load_merged``, ``files.staged_folder`` (a hidden staging folder moved into place only when the block
ends without an error; sized by ``merged_bytes``, so a disk without room for it refuses it before
anything is written) and ``save_merged``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.templates import PromptTemplate, resolve_template
from ..errors import LorakitError
from ..files import atomic_write_json, bytes_on_disk, check_writable_folder, staged_folder
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from ..models.registry import DEFAULT_BASE_MODEL
from ..runfolder import MERGE_RECORD, recorded_base_model
from .adapters import check_adapter_dir, load_adapter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Merged:
    """A base model with its adapter merged in, in memory, and what the merged folder records."""

    model: Any
    tokenizer: Any
    template: PromptTemplate
    base: str
    adapter_dir: Path
    dtype: str


def check_merge_args(adapter: str | Path, out: str | Path, dtype: str, force: bool) -> tuple[Path, Path]:
    """The adapter folder and --out, checked before anything loads: one LorakitError line each."""
    if dtype not in DTYPES:
        raise LorakitError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    adapter_dir = check_adapter_dir(adapter)
    out = Path(out)
    check_writable_folder(out)
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out: {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise LorakitError(f"--out: {out} exists and is not empty; choose another folder or pass --force")
    return adapter_dir, out


def load_merged(
    adapter_dir: Path,
    base: str | None = None,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
    base_weights: dict | None = None,
) -> Merged:
    """The adapter merged into its base. ``base_weights`` (a QLoRA adapter's 4-bit settings,
    qlora_base.trained_in_4bit): merge into the de-quantized 4-bit base instead of the original."""
    base = base or recorded_base_model(adapter_dir) or DEFAULT_BASE_MODEL
    model_path = resolve_model_path(base)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    # Merge in fp32 (exact), then cast once.
    model = load_model(model_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if base_weights:
        from .qlora_base import dequantize_like_training

        dequantize_like_training(model, base_weights)
    model = load_adapter(model, adapter_dir, "default").merge_and_unload()
    model = model.to(DTYPES[dtype])
    model.config.use_cache = True
    template = resolve_template(adapter=adapter_dir, tokenizer=tokenizer)
    return Merged(model, tokenizer, template, base, adapter_dir, dtype)


# the small files of a model folder that a merged folder holds again (config, tokenizer, template)
_SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def merged_bytes(merged: Merged, near: str | Path) -> int:
    """About what ``save_merged`` writes, on the file system of ``near``: every weight once (tied
    weights are one tensor) plus the base folder's config and tokenizer files."""
    weights, seen = 0, set()
    for t in merged.model.state_dict().values():
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            weights += t.nbytes
    sizes = [weights]
    source = Path(str(getattr(merged.tokenizer, "name_or_path", "") or ""))
    if source.is_dir():
        sizes += [(source / name).stat().st_size for name in _SMALL_FILES if (source / name).is_file()]
    return bytes_on_disk(sizes, near)


def save_merged(merged: Merged, folder: Path) -> None:
    """Weights, tokenizer, the template record and the merge record."""
    merged.model.save_pretrained(str(folder))
    merged.tokenizer.save_pretrained(str(folder))
    merged.template.save(folder)
    atomic_write_json(
        folder / MERGE_RECORD,
        {
            "base_model": merged.base,
            "adapter": str(merged.adapter_dir.resolve()),
            "dtype": merged.dtype,
            "template": merged.template.name,
        },
    )


def merge_adapter(
    adapter: str | Path,
    out: str | Path,
    base: str | None = None,
    dtype: str = "fp32",
    force: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    adapter_dir, out = check_merge_args(adapter, out, dtype, force)
    merged = load_merged(adapter_dir, base, dtype, trust_remote_code)
    with staged_folder(out, "merging", needed=merged_bytes(merged, out)) as staging:
        save_merged(merged, staging)
    return out
