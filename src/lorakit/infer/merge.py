"""Merge an adapter into its base: a standalone model folder that plain
``AutoModelForCausalLM.from_pretrained`` loads (safetensors + tokenizer + the template record).

The merged folder always records the template the adapter was trained with (the template
policy's answer for the adapter, also for a checkpoint or a plain peft adapter), so prompting the
merged model gives the same prompt as base + adapter did."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..data.templates import resolve_template
from ..errors import LorakitError
from ..files import atomic_write_json, move_into_place
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from ..models.registry import DEFAULT_BASE_MODEL
from ..runfolder import MERGE_RECORD, recorded_base_model
from .adapters import check_adapter_dir, load_adapter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def merge_adapter(
    adapter: str | Path,
    out: str | Path,
    base: str | None = None,
    dtype: str = "fp32",
    force: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    if dtype not in DTYPES:
        raise LorakitError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    adapter_dir = check_adapter_dir(adapter)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise LorakitError(f"--out: {out} exists and is not empty; choose another folder or pass --force")
    base = base or recorded_base_model(adapter_dir) or DEFAULT_BASE_MODEL
    model_path = resolve_model_path(base)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    # Merge in fp32 (exact), then cast once.
    model = load_model(model_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = load_adapter(model, adapter_dir, "default").merge_and_unload()
    model = model.to(DTYPES[dtype])
    model.config.use_cache = True

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.merging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        template = resolve_template(adapter=adapter_dir, tokenizer=tokenizer)
        template.save(staging)
        atomic_write_json(
            staging / MERGE_RECORD,
            {"base_model": base, "adapter": str(adapter_dir.resolve()), "dtype": dtype, "template": template.name},
        )
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
