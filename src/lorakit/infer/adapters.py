"""One way to load a LoRA adapter folder onto a model, used by generate, chat, eval and serve.

Two folder formats:

- ``safetensors``: a plain peft / lorakit adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``), loaded by peft's own ``load_adapter``;
- ``int8``: written by ``lorakit adapter quantize`` (``adapter_config.json`` +
  ``adapter_model.int8.safetensors``): the LoRA weights as int8 with per-output-channel scales,
  dequantized here to float tensors and put into the model with peft's ``set_peft_model_state_dict``.

Weights are read from safetensors only; a folder that holds only ``adapter_model.bin`` (pickle,
which can run code) is refused before anything is loaded.
"""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from pathlib import Path

from ..errors import ModelError
from ..runfolder import ADAPTER_CONFIG, INT8_WEIGHTS, MANIFEST, recorded_base_model
from ..runfolder import ADAPTER_WEIGHTS as FLOAT_WEIGHTS

PICKLE_WEIGHTS = "adapter_model.bin"
_ANY_RANK = 1024  # a rank this small is never refused for its size (small matrices: small memory)
_LORA_MATRIX = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B)(\.|$)")  # as in quantize.py


def check_adapter_dir(adapter: str | Path) -> Path:
    """An adapter folder: adapter_config.json + adapter_model.safetensors, or a lorakit int8
    folder (adapter_model.int8.safetensors); never pickle files. What can be checked without the
    model is, so a bad folder fails before any model loads: the config is a JSON object whose
    ranks the weights can hold, the weights file's header reads, the recorded base model and
    template are usable."""
    path = _adapter_layout(adapter)
    config = _config_json(path)
    weights = path / (FLOAT_WEIGHTS if (path / FLOAT_WEIGHTS).is_file() else INT8_WEIGHTS)
    shapes = _weight_shapes(weights)
    if config.get("peft_type", "LORA") == "LORA":
        _check_ranks(path / ADAPTER_CONFIG, config, weights, shapes)
    _check_records(path, config)
    return path


def _adapter_layout(adapter: str | Path) -> Path:
    """The folder holds a config and safetensors weights (the cheap part of check_adapter_dir)."""
    path = Path(adapter)
    try:
        if not path.is_dir():
            raise ModelError(f"adapter: {path} is not a folder")
        if not (path / ADAPTER_CONFIG).is_file():
            raise ModelError(f"adapter: {path} holds no adapter_config.json (is it a lorakit/peft adapter folder?)")
        if not (path / FLOAT_WEIGHTS).is_file() and not (path / INT8_WEIGHTS).is_file():
            if (path / PICKLE_WEIGHTS).is_file():
                raise ModelError(
                    f"adapter: {path} holds only adapter_model.bin (pickle, which can run code); "
                    "lorakit loads safetensors only: re-save it with save_pretrained(safe_serialization=True)"
                )
            raise ModelError(f"adapter: {path} holds no adapter_model.safetensors (nor a lorakit int8 {INT8_WEIGHTS})")
    except OSError as e:  # a name too long for the file system, a folder that cannot be searched
        raise ModelError(f"adapter: {path}: {e.strerror or e}") from None
    return path


def _config_json(folder: Path) -> dict:
    file = folder / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, a 5000-digit number
        if isinstance(e, RecursionError):
            reason = "lists or objects nested too deeply"
        elif "integer string conversion" in str(e):
            reason = f"a number with more than {sys.get_int_max_str_digits()} digits"
        else:
            reason = _first_line(e)
        raise ModelError(f"adapter: {file} is not a valid peft adapter config: {reason}") from None
    if not isinstance(config, dict):
        raise ModelError(f"adapter: {file} is not a valid peft adapter config: a JSON object is needed")
    return config


def _weight_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors header (the data is not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    except Exception as e:  # safetensors raises its own SafetensorError (truncated, not safetensors at all)
        if weights.name == INT8_WEIGHTS:  # as quantize.read_int8_adapter words it
            raise ModelError(
                f"adapter: {weights} is not a valid lorakit int8 adapter (unreadable: {_first_line(e)[:160]}); "
                "quantize the float adapter again with: lorakit adapter quantize"
            ) from None
        raise ModelError(f"adapter: {weights} is not a readable safetensors file: {_first_line(e)}") from None


def _check_ranks(file: Path, config: dict, weights: Path, shapes: dict) -> None:
    """The ranks the config asks for fit the LoRA matrices in the weights file: peft makes every
    layer's matrices from the config before it reads a weight, so a corrupt or foreign rank
    (r: 100000000) would take all memory before the mismatch shows."""
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise ModelError(f"adapter: {file}: 'rank_pattern' must be an object {{module pattern: rank}}")
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(name) or {}
        for key in patterns if isinstance(patterns, dict) else ():
            try:  # peft matches module names with rf"(.*\.)?({key})$"
                re.compile(rf"(.*\.)?({key})$")
            except re.error as e:
                raise ModelError(f"adapter: {file}: {name} key {key!r} is not a valid pattern ({e})") from None
    ranks = {"'r'": config.get("r", 8), **{f"rank_pattern[{k!r}]": v for k, v in pattern.items()}}
    for where, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            shown = _first_line(ValueError(repr(rank)))[:60]
            raise ModelError(f"adapter: {file}: {where} must be a positive whole number (a LoRA rank), got {shown}")
    # A guard against memory, not a shape check (peft's own load names a mismatch): no rank above
    # the largest dimension of the adapted layers (the file's non-empty LoRA matrices), or 1024.
    largest = max((max(s) for k, s in shapes.items() if _LORA_MATRIX.search(k) and s and math.prod(s)), default=0)
    if not largest:
        raise ModelError(f"adapter: {weights} holds no LoRA matrices (lora_A, lora_B), which {file.name} asks for")
    for where, rank in ranks.items():
        if rank > max(largest, _ANY_RANK):
            raise ModelError(
                f"adapter: {file}: {where} is {rank}, above every dimension of the LoRA matrices in "
                f"{weights.name} ({largest}); the config and the weights do not belong together"
            )


def _check_records(folder: Path, config: dict) -> None:
    """The base model and template the folder records can be used (generate and serve take them)."""
    from ..data.templates import recorded_template

    recorded = {ADAPTER_CONFIG: config, MANIFEST: _json_object(folder / MANIFEST)}
    for name, keys in ((ADAPTER_CONFIG, ("base_model_name_or_path",)), (MANIFEST, ("base_model", "base_model_path"))):
        for key in keys:
            value = (recorded[name] or {}).get(key)
            if value is not None and not isinstance(value, str):
                raise ModelError(f"adapter: {folder / name}: '{key}' must be a string (a model), got {_type(value)}")
    try:
        recorded_base_model(folder)
    except (OSError, ValueError, RecursionError) as e:  # a name too long for the file system; a nested manifest
        reason = "its manifest is nested too deeply" if isinstance(e, RecursionError) else _first_line(e)
        raise ModelError(f"adapter: {folder}: its recorded base model is no usable path ({reason})") from None
    recorded_template(folder)  # its record, its run's, or the one its run's config names: a ConfigError naming it


def _json_object(path: Path) -> dict | None:
    """A JSON object file as runfolder reads it: None when missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _type(value) -> str:
    return {type(None): "null", dict: "object"}.get(type(value), type(value).__name__)


def adapter_format(path: str | Path) -> str:
    """``"safetensors"`` (a float peft adapter) or ``"int8"`` (lorakit's quantized folder).
    A folder holding both files is read as the float adapter, as plain peft would."""
    folder = _adapter_layout(path)
    return "safetensors" if (folder / FLOAT_WEIGHTS).is_file() else "int8"


def adapter_weights_file(path: str | Path) -> Path:
    """The weights file the folder's format loads from."""
    folder = _adapter_layout(path)
    return folder / (FLOAT_WEIGHTS if adapter_format(folder) == "safetensors" else INT8_WEIGHTS)


def adapter_param_count(path: str | Path) -> int:
    """Number of adapter weights (elements), whatever the format (int8 scales not counted)."""
    import math

    from safetensors import safe_open

    from .quantize import SCALE_SUFFIX

    weights = adapter_weights_file(path)
    try:
        with safe_open(str(weights), "pt") as f:
            return int(sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(SCALE_SUFFIX)))  # noqa: SIM118 - safe_open is no dict
    except Exception as e:
        raise ModelError(f"adapter: {weights} is not a readable safetensors file: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # torch: "Error(s) in loading state_dict for X:", then the first
        lines = [f"{lines[0]} {lines[1]}"]
    return (lines[0] if lines else type(e).__name__)[:300]


def _check_adapter_name(name) -> None:
    """peft keeps adapters in torch ModuleDicts: the name becomes a module attribute."""
    import torch

    if not isinstance(name, str) or not name or "." in name or name.startswith("_") or name.strip() != name:
        raise ModelError(
            f"adapter name {name!r}: use a non-empty name without dots, spaces at the ends or a leading underscore"
        )
    if hasattr(torch.nn.ModuleDict(), name) or name in ("base_layer", "lora_A", "lora_B"):
        raise ModelError(f"adapter name {name!r} is reserved (a torch module attribute); choose another name")


def _is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _base_name(model) -> str:
    base = base_model_of(model)
    config = getattr(base, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or type(base).__name__


def _read_config(folder: Path):
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        peft_type = PeftConfig._get_peft_type(str(folder))
        return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(str(folder))
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ModelError(
            f"adapter: {folder / ADAPTER_CONFIG} is not a valid peft adapter config: {_first_line(e)}"
        ) from None


def _key_mapped(state: dict, model) -> dict:
    """Apply the model's checkpoint key mapping as peft's load_peft_weights does."""

    mapping = getattr(base_model_of(model), "_checkpoint_conversion_mapping", None)
    if not mapping:
        return state
    out = {}
    for key, val in state.items():
        prefix = (
            "base_model.model."
            if key.startswith("base_model.model.")
            else ("base_model." if key.startswith("base_model.") else "")
        )
        rest = key[len(prefix) :]
        for pattern, replacement in mapping.items():
            new, n = re.subn(pattern, replacement, rest)
            if n:
                rest = new
                break
        out[prefix + rest] = val
    return out


def _check_load_result(result, adapter_name: str) -> None:
    # this adapter's own weights only: the name right after lora_A / lora_B / ... / modules_to_save
    # (not anywhere in the key: an adapter named "0" is not "layers.0.", found by schemathesis)
    own = re.compile(rf"\.(lora_[A-Za-z_]+|modules_to_save)\.{re.escape(adapter_name)}(\.|$)")
    missing = [k for k in getattr(result, "missing_keys", []) if own.search(k)]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected or missing:
        detail = []
        if unexpected:
            detail.append(f"{len(unexpected)} adapter weights the model has no place for (e.g. {unexpected[0]})")
        if missing:
            detail.append(f"{len(missing)} adapter weights missing from the file (e.g. {missing[0]})")
        raise ValueError("; ".join(detail))


def load_adapter(model, path: str | Path, adapter_name: str):
    """Load the adapter folder onto ``model`` under ``adapter_name``; returns the PeftModel.

    ``model`` is a plain transformers model (it is wrapped in the PeftModel class for the
    adapter's task type, as ``PeftModel.from_pretrained`` does; the new adapter is active) or
    already a PeftModel (the adapter is added beside the others and the active adapter is not
    changed, unless the model had no adapter left). Float folders are loaded by peft's own
    ``load_adapter``; int8 folders are dequantized to float tensors and set with
    ``set_peft_model_state_dict``. The adapter is frozen and the model is put in eval mode.

    An adapter that does not fit the base (target modules it lacks, other shapes, weights with
    no place in the model) raises ModelError with one line; the model is left as it was."""
    folder = check_adapter_dir(path)  # before the model is touched: config, weights header, ranks
    fmt = adapter_format(folder)
    _check_adapter_name(adapter_name)
    was_peft = _is_peft_model(model)
    if was_peft and adapter_name in model.peft_config:
        raise ModelError(f"adapter name {adapter_name!r} is already loaded; unload it first or choose another name")
    from safetensors import SafetensorError

    config = _read_config(folder)
    state = None
    if fmt == "int8":
        from .quantize import read_int8_adapter

        state = _key_mapped(read_int8_adapter(folder), model)  # a corrupt file fails before the model is touched
    config.inference_mode = True
    base_name = _base_name(model)
    had_adapters = was_peft and len(model.peft_config) > 0

    peft_model = model if was_peft else None
    tree = _module_tree(model)  # what a failed load restores (peft may wrap modules before it fails)
    added = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's missing-key warnings: checked below as errors
            if peft_model is None:
                from peft import PeftModel
                from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

                cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
                peft_model = cls(model, config, adapter_name)  # injects the (untrained) adapter layers
            else:
                peft_model.add_adapter(adapter_name, config)
            added = True
            if fmt == "safetensors":
                # config already in place: peft's load_adapter only reads the weights (safetensors)
                mapping = getattr(base_model_of(peft_model), "_checkpoint_conversion_mapping", None) or None
                result = peft_model.load_adapter(str(folder), adapter_name, is_trainable=False, key_mapping=mapping)
            else:
                from peft import set_peft_model_state_dict

                result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
            _check_load_result(result, adapter_name)
    except ModelError:
        _roll_back(model, adapter_name, added, tree)
        raise
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, SafetensorError, re.error) as e:
        _roll_back(model, adapter_name, added, tree)
        raise ModelError(f"adapter {folder} does not fit base model {base_name}: {_first_line(e)}") from None
    if was_peft and not had_adapters:  # the model had no adapter left: this one becomes active
        peft_model.set_adapter(adapter_name, inference_mode=True)
    peft_model.eval()
    return peft_model


def base_model_of(model):
    """The transformers model under a PeftModel (itself for a plain model). Its LoRA layers
    without an adapter pass through to the original layers, so with no adapter loaded it runs
    as the base; with adapters loaded, use ``model.disable_adapter()`` for base outputs instead."""
    return model.base_model.model if _is_peft_model(model) else model


def _module_tree(model) -> list[tuple]:
    """Every module's children and every parameter's requires_grad: what peft changes when it wraps
    a plain model (it replaces children in place and freezes the base)."""
    modules = [(m, dict(m._modules)) for m in model.modules()]
    return modules + [(p, p.requires_grad) for p in model.parameters()]


def _roll_back(model, adapter_name: str, added: bool, tree: list[tuple]) -> None:
    """Undo a failed load: remove the half-loaded adapter's config, and give the model its modules
    back exactly as they were (``tree``), also when peft failed halfway through wrapping it
    (modules_to_save naming a whole block left wrappers inside wrappers; in a serving model those
    nested deeper with every failed request, found by the fuzz tests)."""
    try:
        if _is_peft_model(model) and added and adapter_name in model.peft_config:
            try:
                model.delete_adapter(adapter_name)
            except Exception:
                model.peft_config.pop(adapter_name, None)
        for owner, saved in tree:
            if isinstance(saved, dict):
                owner._modules.clear()
                owner._modules.update(saved)
            else:
                owner.requires_grad_(saved)
        if not _is_peft_model(model) and hasattr(model, "peft_config"):
            del model.peft_config
    except Exception:
        pass


def unload_adapter(model, adapter_name: str) -> None:
    """Delete the adapter ``adapter_name`` from the PeftModel and free its weights (peft's
    delete_adapter). If it was the active adapter, peft makes another loaded one active.

    Works for the last adapter too; the PeftModel then holds none, and peft 0.21 cannot run such
    a model itself (its forward, generate, disable_adapter and get_base_model look up the active
    adapter's config): run the base through ``base_model_of(model)``, or load an adapter again
    (``load_adapter`` makes it the active one)."""
    if not _is_peft_model(model) or adapter_name not in model.peft_config:
        loaded = ", ".join(model.peft_config) if _is_peft_model(model) else ""
        raise ModelError(f"adapter {adapter_name!r} is not loaded (loaded: {loaded or 'none'})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "adapter X was active ... setting active adapter to Y"
        model.delete_adapter(adapter_name)
