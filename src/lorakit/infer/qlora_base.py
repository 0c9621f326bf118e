"""The base a QLoRA adapter actually trained against: the full-precision base, 4-bit round-tripped.

An adapter trained with ``load_in_4bit`` learned corrections on top of the NF4-quantized base, not
the original weights. When it is merged for export, merging into the de-quantized 4-bit base (the
weights training saw) can match lorakit's own answers better than merging into the original base;
export merges into both and keeps the better. This module rebuilds that de-quantized base in place:

- ``trained_in_4bit(adapter_dir)``: the 4-bit settings the adapter's run trained with, or None.
- ``quantized_module_names(model, settings)``: the modules transformers' bitsandbytes 4-bit loading
  quantizes (its own skip rule: tied / output embeddings, the last module, llm_int8_skip_modules,
  _keep_in_fp32_modules).
- ``dequantize_like_training(model, settings)``: each of those weights replaced by
  ``dequantize_4bit(quantize_4bit(weight))`` from bitsandbytes itself, with the recorded settings.

bitsandbytes (the ``qlora`` extra) is needed only here, imported when used; 0.50.2 runs these two
functions on CPU tensors, older releases may need a CUDA GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..runfolder import read_config_record, read_manifest, run_of

# transformers' BitsAndBytesConfig has no block size: Params4bit's default (64) is what QLoRA
# loading uses. Double quantization's own block size (256) is fixed inside bitsandbytes.
BLOCKSIZE = 64

# lorakit's resolved precision -> the compute dtype training used (as train/recipe.py picks it)
_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def trained_in_4bit(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The 4-bit settings an adapter's run trained with, or None when it did not train in 4-bit or
    its run recorded no config.

    ``adapter_dir`` is a run folder or a checkpoint-N inside one: the folder's own config record
    when it has one, else its run's. The record says only *whether* the base was 4-bit; how is
    lorakit's fixed choice, read from the same ``quantization_config`` training calls. The result
    is plain JSON (dtypes as names), fit for an export record::

        {"quant_type": "nf4", "double_quant": True, "blocksize": 64, "quant_storage": "uint8",
         "skip_modules": None, "compute_dtype": "bfloat16"}

    ``compute_dtype`` (None when the run's precision is not known) is what the 4-bit matmuls ran
    in; the round trip itself does not depend on it.
    """
    from ..models.loading import quantization_config

    folder = Path(adapter_dir)
    run = run_of(folder)
    config = read_config_record(folder) or read_config_record(run)
    if not config or config.get("load_in_4bit") is not True:
        return None
    # the manifest holds the resolved precision ("auto" resolved); the config record the asked one
    manifest = read_manifest(folder) or read_manifest(run) or {}
    compute = _COMPUTE_DTYPES.get(manifest.get("precision") or config.get("precision"))
    bnb_config = quantization_config(False, True, compute or torch.float32)
    skip = bnb_config.llm_int8_skip_modules
    return {
        "quant_type": bnb_config.bnb_4bit_quant_type,
        "double_quant": bool(bnb_config.bnb_4bit_use_double_quant),
        "blocksize": BLOCKSIZE,
        "quant_storage": _dtype_name(bnb_config.bnb_4bit_quant_storage),
        "skip_modules": list(skip) if skip is not None else None,
        "compute_dtype": _dtype_name(compute) if compute is not None else None,
    }


def quantized_module_names(model, settings: dict[str, Any]) -> list[str]:
    """Names of the modules transformers' bitsandbytes 4-bit loading would quantize in ``model``
    (a transformers model, without an adapter): every ``nn.Linear`` (exactly that type) and GPT-2
    style ``Conv1D`` not matched by the modules transformers keeps in full precision."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    if hasattr(model, "peft_config"):
        raise ValueError("dequantize the base model before an adapter is applied to it")
    # transformers' Bnb4BitHfQuantizer._process_model_before_weight_loading, then replace_with_bnb_linear
    keep = HfQuantizer.get_modules_to_not_convert(
        model, settings.get("skip_modules"), getattr(model, "_keep_in_fp32_modules", None)
    )
    return [
        name
        for name, module in model.named_modules()
        if (isinstance(module, Conv1D) or type(module) is torch.nn.Linear) and should_convert_module(name, keep)
    ]


def dequantize_like_training(model, settings: dict[str, Any]) -> int:
    """In place, give every module 4-bit loading would quantize (``quantized_module_names``) the
    weight training computed with: bitsandbytes' ``dequantize_4bit(quantize_4bit(weight))`` with
    ``settings`` (from ``trained_in_4bit``), on the weight's device, back in the weight's dtype.
    Tied and other weights are left alone. Returns the number of modules replaced.

    Training quantized the base as loaded in fp32; a bf16/fp16 weight is round-tripped from its
    exact fp32 value. Raises ExportError (one line) when bitsandbytes is missing or cannot run on
    the weights' device.
    """
    from transformers.pytorch_utils import Conv1D

    functional = _bnb_functional()
    names = quantized_module_names(model, settings)
    checked: set[torch.device] = set()
    with torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            weight = module.weight
            if weight.device not in checked:
                _check_device(functional, weight.device, settings)
                checked.add(weight.device)
            # transformers quantizes a Conv1D weight (in, out) transposed, as the Linear it stands for
            transposed = isinstance(module, Conv1D)
            source = weight.detach().t() if transposed else weight.detach()
            restored = _round_trip(functional, source, settings)
            weight.copy_(restored.t() if transposed else restored)
    return len(names)


# ---- bitsandbytes ------------------------------------------------------------------------------


def _round_trip(functional, weight: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    packed, state = functional.quantize_4bit(
        weight.contiguous().to(torch.float32),
        blocksize=settings["blocksize"],
        compress_statistics=settings["double_quant"],
        quant_type=settings["quant_type"],
        quant_storage=getattr(torch, settings.get("quant_storage") or "uint8"),
    )
    return functional.dequantize_4bit(packed, state).to(weight.dtype)


def _bnb_functional():
    from .export import ExportError  # here: export imports this module

    try:
        from bitsandbytes import functional
    except ImportError:
        raise ExportError(
            "the adapter trained on a 4-bit (QLoRA) base; rebuilding that base needs bitsandbytes: "
            "pip install bitsandbytes"
        ) from None
    except Exception as e:  # a broken install fails at import with its own errors
        raise ExportError(f"bitsandbytes could not be imported ({_first_line(e)}): pip install -U bitsandbytes") from e
    return functional


def _check_device(functional, device: torch.device, settings: dict[str, Any]) -> None:
    """A round trip of one small block, so an unsupported device fails with one line, not a kernel trace."""
    from .export import ExportError

    try:
        probe = torch.linspace(-1, 1, 4 * settings["blocksize"], device=device).reshape(4, -1)
        _round_trip(functional, probe, settings)
    except Exception as e:
        import bitsandbytes

        version = getattr(bitsandbytes, "__version__", "?")
        raise ExportError(
            f"bitsandbytes {version} cannot run 4-bit {settings['quant_type']} quantization on {device} "
            f"({_first_line(e)}): pip install -U bitsandbytes (0.50.2 runs on CPU) or export on a CUDA GPU"
        ) from e


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
