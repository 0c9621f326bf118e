"""Carry peft's per-module LoRA scale into a GGUF LoRA.

llama.cpp applies every LoRA pair of a GGUF with ``scale = alpha / rank``: ``alpha`` is the file's ONE
``adapter.lora.alpha`` (convert_lora_to_gguf.py writes adapter_config.json's ``lora_alpha``) and ``rank``
is read from each lora_b tensor's shape (``llama_adapter_lora_weight::get_scale``, llama-adapter.h).
peft scales each module by ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``, with ``r`` and
``alpha`` overridden per module by ``rank_pattern`` and ``alpha_pattern``. Where the two disagree (rsLoRA,
an alpha_pattern) llama.cpp would silently apply the adapter at the wrong strength, so
``fold_for_llama_cpp`` writes a copy of the adapter whose lora_B carries the difference:
``B * peft_scale / (lora_alpha / rank)``, with a config llama.cpp's rule reads right.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

from ..runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from .export import ExportError

PEFT_PREFIX = "base_model.model."
# lora_B's weight (and its bias with lora_bias) for Linear layers, lora_embedding_B for Embedding layers
_B_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_B\.(?:weight|bias)|lora_embedding_B)$")
# what convert_lora_to_gguf.py reads from the adapter folder besides the weights and the config: the
# model card metadata (gguf.Metadata.load on dir_model_card = the adapter folder)
CONVERTER_EXTRAS = ("README.md", "config.json", "generation_config.json")


def _pattern_key(patterns, module: str) -> str | None:
    """The rank_pattern / alpha_pattern key peft applies to ``module`` (peft's own matcher), or None."""
    if not patterns:
        return None
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:  # an older peft: the same rule

        def get_pattern_key(keys, name):
            return next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), name)

    key = get_pattern_key(list(patterns), module)
    return key if key in patterns else None


def _number(config: dict, key: str, where: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ExportError(f"{where}: {key} is {value!r}, not a number")
    return float(value)


def fold_for_llama_cpp(adapter_dir: Path, dest: Path) -> tuple[Path, dict]:
    """``(adapter_dir, {"folded": False, ...})`` when llama.cpp's ``lora_alpha / rank`` is peft's scale for
    every module; else ``(dest, {"folded": True, "alpha", "modules", "scales"})`` with ``dest`` a new folder
    holding the adapter with each lora_B multiplied by ``peft_scale / (lora_alpha / rank)``."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    config = read_adapter_config(adapter_dir)
    if config is None:
        raise ExportError(f"{config_file}: missing or not a JSON object")
    if not weights_file.is_file():
        raise ExportError(f"{weights_file}: missing (the float LoRA weights are needed)")
    if "lora_alpha" not in config:
        raise ExportError(f"{config_file}: no lora_alpha (llama.cpp's LoRA scale is lora_alpha / rank)")
    alpha = _number(config, "lora_alpha", str(config_file))
    if alpha == 0:
        raise ExportError(f"{config_file}: lora_alpha is 0 (llama.cpp would read it as 'no scaling', scale 1)")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    with safe_open(str(weights_file), framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
    modules: dict[str, list[str]] = {}  # module name (as peft matches it) -> its lora_B tensors
    for key in keys:
        match = _B_KEY.match(key)
        if match:
            modules.setdefault(match["module"].removeprefix(PEFT_PREFIX), []).append(key)
    if not modules:
        raise ExportError(f"{weights_file}: no lora_B tensors")

    factors: dict[str, float] = {}
    groups: dict[str, str] = {}  # module -> what set its scale: "default" or the pattern keys
    for module, b_keys in modules.items():
        weight = next((k for k in b_keys if not k.endswith(".bias")), None)
        if weight is None or len(shapes[weight]) < 2:
            raise ExportError(f"{weights_file}: no 2-d lora_B weight for {module}")
        rank = shapes[weight][-1]  # convert_lora_to_gguf's rank (B.shape[-1]) = llama.cpp's b->ne[0]
        r_key, a_key = _pattern_key(rank_pattern, module), _pattern_key(alpha_pattern, module)
        if r_key:
            where = f"{config_file}: rank_pattern[{r_key!r}]"
            r = _number(rank_pattern, r_key, f"{config_file}: rank_pattern")
        else:
            where = f"{config_file}: r"
            r = _number(config, "r", str(config_file)) if "r" in config else rank
        if r != rank:
            raise ExportError(f"{where} is {r:g} for {module} but {weights_file.name} holds rank {rank}")
        if a_key:
            module_alpha = _number(alpha_pattern, a_key, f"{config_file}: alpha_pattern")
        else:
            module_alpha = alpha
        peft_scale = module_alpha / (math.sqrt(r) if rslora else r)
        factors[module] = peft_scale / (alpha / rank)
        parts = [f"rank_pattern {r_key}"] * bool(r_key) + [f"alpha_pattern {a_key}"] * bool(a_key)
        groups[module] = ", ".join(parts) or "default"

    if all(math.isclose(f, 1.0, rel_tol=1e-6) for f in factors.values()):
        return adapter_dir, {
            "folded": False,
            "reason": "peft's scale is lora_alpha / rank for every module, as llama.cpp applies it",
        }

    _write_folded(adapter_dir, dest, config, modules, factors)
    by_factor: dict[float, list[str]] = {}
    for module, factor in factors.items():
        labels = by_factor.setdefault(round(factor, 6), [])
        if groups[module] not in labels:
            labels.append(groups[module])
    return dest, {
        "folded": True,
        "alpha": alpha,
        "rule": "lora_B *= peft_scale / (lora_alpha / rank): llama.cpp applies lora_alpha / rank",
        "use_rslora": rslora,
        "modules": sum(not math.isclose(f, 1.0, rel_tol=1e-6) for f in factors.values()),
        "total_modules": len(factors),
        "scales": {"; ".join(labels): factor for factor, labels in by_factor.items()},
    }


def _write_folded(adapter_dir: Path, dest: Path, config: dict, modules: dict, factors: dict) -> None:
    """``dest``: the weights with lora_B scaled (in fp32, stored back in their dtype), the config
    without rsLoRA and patterns, and the files convert_lora_to_gguf.py reads for its metadata."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if dest.exists():
        raise ExportError(f"{dest}: already exists (the folded adapter goes into a new folder)")
    scale_of = {key: factors[module] for module, b_keys in modules.items() for key in b_keys}
    tensors = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        metadata, keys = f.metadata(), f.keys()
        for key in keys:
            tensor = f.get_tensor(key)
            factor = scale_of.get(key, 1.0)
            if not math.isclose(factor, 1.0, rel_tol=1e-6):
                tensor = (tensor.to(torch.float32) * factor).to(tensor.dtype)
            tensors[key] = tensor.contiguous()
    dest.mkdir(parents=True)
    save_file(tensors, str(dest / ADAPTER_WEIGHTS), metadata=metadata)
    # llama.cpp's rule (lora_alpha / rank, rank from each tensor) now gives the scale the weights need;
    # the converter reads neither r nor rank_pattern, and peft_scale is folded in for every module
    folded = {k: v for k, v in config.items() if k not in ("alpha_pattern", "rank_pattern")}
    folded["use_rslora"] = False
    (dest / ADAPTER_CONFIG).write_text(json.dumps(folded, indent=2) + "\n", encoding="utf-8")
    for name in CONVERTER_EXTRAS:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, dest / name)
