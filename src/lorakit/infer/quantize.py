"""INT8 LoRA adapters for deployment: ``lorakit adapter quantize DIR --out DIR2``.

Format (``adapter_model.int8.safetensors``, a name plain peft does not read as a float adapter):

- every LoRA matrix (``lora_A``, ``lora_B``, ``lora_embedding_A/B``) is stored under its peft
  name as int8, symmetric, one scale per output channel (row, dim 0):
  ``scale = max|row| / 127`` rounded *up* to the stored scale dtype, ``q = round(w / scale)``
  in [-127, 127], so ``|w - q * scale| <= scale / 2`` for every element;
- its scales under ``<name>::int8_scale``: float16 where every scale of the tensor is a normal
  float16 number, else bfloat16 (float32's range; LoRA B matrices after short training are often
  that small). Rounding up to the stored value keeps the bound above exact;
- every other tensor (modules_to_save, biases, DoRA magnitudes) stays as it was (float);
- the safetensors metadata says ``lorakit_format: int8`` and holds a sha256 of every tensor's
  name, dtype, shape and bytes, checked on load, so a damaged file is refused, not half-used.

The folder is written to a staging folder beside ``--out``, read back and checked, then renamed
into place: an interrupted run leaves no half-written adapter, and a disk without room for it is
one error line (files.staged_folder).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch

from ..errors import LorakitError, ModelError
from ..files import atomic_write_json, bytes_on_disk, staged_folder
from ..runfolder import MANIFEST
from .adapters import ADAPTER_CONFIG, FLOAT_WEIGHTS, INT8_WEIGHTS, adapter_format, check_adapter_dir

SCALE_SUFFIX = "::int8_scale"
FORMAT_KEY = "lorakit_format"
FORMAT_VERSION = "1"
_LORA_MATRIX = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B)(\.|$)")
# Small text files of an adapter folder that travel with it (template record, manifest, config,
# train log, tokenizer files); weights and pickles never do.
_COPIED_SUFFIXES = {".json", ".jsonl", ".yaml", ".yml", ".md", ".txt", ".jinja"}


def is_lora_matrix(name: str, tensor: torch.Tensor) -> bool:
    return bool(_LORA_MATRIX.search(name)) and tensor.is_floating_point() and tensor.dim() >= 2


def _round_up_to(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    stored = scale.to(dtype)
    low = stored.float() < scale
    if low.any():
        stored[low] = torch.nextafter(stored[low], torch.full_like(stored[low], float("inf")))
    return stored


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and per-row (dim 0) scales of a float tensor; see the module docstring."""
    rows = w.detach().float().reshape(w.shape[0], -1)
    scale = rows.abs().amax(dim=1) / 127.0
    nonzero = scale[scale > 0]
    fp16_ok = bool(
        nonzero.numel() == 0
        or (
            nonzero.min() >= torch.finfo(torch.float16).tiny
            and nonzero.max() * (1 + 2**-10) <= torch.finfo(torch.float16).max
        )
    )
    stored = _round_up_to(scale, torch.float16 if fp16_ok else torch.bfloat16)
    s = stored.float()
    q = torch.round(rows / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)).clamp_(-127, 127)
    return q.to(torch.int8).reshape(w.shape), stored


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float().reshape(q.shape[0], -1) * scale.float().unsqueeze(1)).reshape(q.shape)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{list(tensors[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_int8_adapter(folder: str | Path) -> dict[str, torch.Tensor]:
    """The float state dict of a lorakit int8 adapter folder (LoRA matrices dequantized to
    float32, other tensors as stored). A damaged or foreign file raises ModelError."""
    from safetensors import safe_open

    path = Path(folder) / INT8_WEIGHTS

    def bad(reason: str) -> ModelError:
        return ModelError(
            f"adapter: {path} is not a valid lorakit int8 adapter ({reason}); "
            "quantize the float adapter again with: lorakit adapter quantize"
        )

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    except Exception as e:
        text = str(e).strip().splitlines()
        raise bad(f"unreadable: {(text[0] if text else type(e).__name__)[:160]}") from None
    if metadata.get(FORMAT_KEY) != "int8":
        raise bad(f"its metadata does not say {FORMAT_KEY}=int8")
    if metadata.get("lorakit_int8_version") != FORMAT_VERSION:
        raise bad(f"format version {metadata.get('lorakit_int8_version')!r}, this lorakit reads {FORMAT_VERSION}")
    if metadata.get("lorakit_int8_sha256") != _digest(tensors):
        raise bad("checksum mismatch: the file was changed or damaged after it was written")
    state: dict[str, torch.Tensor] = {}
    scales = {k[: -len(SCALE_SUFFIX)]: v for k, v in tensors.items() if k.endswith(SCALE_SUFFIX)}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in tensors:
                raise bad(f"scale {name} has no int8 tensor")
            continue
        if t.dtype == torch.int8:
            s = scales.get(name)
            if s is None or s.dim() != 1 or s.shape[0] != t.shape[0] or not s.is_floating_point():
                raise bad(f"int8 tensor {name} has no matching per-row scale")
            if not torch.isfinite(s).all() or (s < 0).any():
                raise bad(f"scale of {name} holds NaN, inf or negative values")
            state[name] = dequantize_tensor(t, s)
        else:
            state[name] = t
    if not state:
        raise bad("it holds no tensors")
    return state


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix.lower() in _COPIED_SUFFIXES:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def quantize_adapter(src: str | Path, out: str | Path, force: bool = False) -> dict:
    """Write an int8 copy of the float LoRA adapter folder ``src`` to ``out``.

    Returns figures: size_before_bytes / size_after_bytes (the weights files), ratio,
    max_abs_weight_error (over all LoRA matrices, against the float file), tensor counts."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    src = check_adapter_dir(src)
    if adapter_format(src) == "int8":
        raise LorakitError(f"adapter quantize: {src} is already an int8 adapter")
    out = Path(out)
    if out.resolve() == src.resolve():
        raise LorakitError("--out: must be a new folder, not the adapter folder itself")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise LorakitError(f"--out: {out} exists and is not empty; choose another folder or pass --force")
    try:
        config = json.loads((src / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"adapter: {src / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise LorakitError(
            f"adapter quantize: {src} is a {config.get('peft_type') if isinstance(config, dict) else '?'} "
            "adapter; only LoRA adapters can be quantized"
        )
    weights = src / FLOAT_WEIGHTS
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ModelError(
            f"adapter: {weights} is not a readable safetensors file: {str(e).splitlines()[0][:160]}"
        ) from None

    tensors: dict[str, torch.Tensor] = {}
    n_quantized = n_float = 0
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"adapter: {weights}: tensor {name} holds NaN or inf; it cannot be quantized")
        if name.endswith(SCALE_SUFFIX):
            raise ModelError(f"adapter: {weights}: tensor name {name} is reserved for int8 scales")
        if is_lora_matrix(name, t):
            q, s = quantize_tensor(t)
            tensors[name], tensors[name + SCALE_SUFFIX] = q, s.contiguous()
            n_quantized += 1
        else:
            tensors[name] = t.contiguous()
            n_float += 1
    if n_quantized == 0:
        raise LorakitError(f"adapter quantize: {weights} holds no LoRA matrices (lora_A/lora_B) to quantize")
    metadata = {
        "format": "pt",
        FORMAT_KEY: "int8",
        "lorakit_int8_version": FORMAT_VERSION,
        "lorakit_int8_scheme": "symmetric int8, one scale per output channel (dim 0), "
        "scale=max|row|/127 rounded up to float16 or bfloat16",
        "lorakit_int8_sha256": _digest(tensors),
    }

    # the int8 file (tensors + at least 100 bytes of header each) and the side files copied beside it
    side = [f.stat().st_size for f in src.iterdir() if f.is_file() and f.suffix.lower() in _COPIED_SUFFIXES]
    needed = bytes_on_disk([sum(t.nbytes + 100 for t in tensors.values()), *side], out)
    with staged_folder(out, "quantizing", needed=needed) as staging:
        copied = _copy_side_files(src, staging)
        save_file(tensors, str(staging / INT8_WEIGHTS), metadata=metadata)
        # read back as every loader will, and check the error bound against the float weights
        back = read_int8_adapter(staging)
        max_err = 0.0
        for name, t in state.items():
            if name + SCALE_SUFFIX in tensors:
                err = (back[name] - t.float()).abs()
                bound = tensors[name + SCALE_SUFFIX].float().reshape(-1, *[1] * (t.dim() - 1)) / 2
                if (err > bound * (1 + 1e-6) + 1e-30).any():
                    raise ModelError(f"adapter quantize: {name} does not meet the int8 error bound after writing")
                max_err = max(max_err, float(err.max()))
            elif not torch.equal(back[name], t):
                raise ModelError(f"adapter quantize: {name} changed on the way through the int8 file")
        before, after = weights.stat().st_size, (staging / INT8_WEIGHTS).stat().st_size
        figures = {
            "adapter": str(src),
            "out": str(out),
            "format": "int8",
            "size_before_bytes": before,
            "size_after_bytes": after,
            "ratio": before / after,
            "max_abs_weight_error": max_err,
            "quantized_tensors": n_quantized,
            "float_tensors": n_float,
        }
        manifest = staging / MANIFEST
        if manifest.is_file():  # say what this folder is; the training record stays as it was
            try:
                record = json.loads(manifest.read_text(encoding="utf-8"))
                if isinstance(record, dict):
                    record["quantization"] = {k: v for k, v in figures.items() if k not in ("adapter", "out")}
                    record["quantization"]["source"] = str(src.resolve())
                    atomic_write_json(manifest, record)
            except json.JSONDecodeError:
                pass  # copied as it was
        figures["copied_files"] = copied
    return figures
