"""Saving an adapter you can trust: write to a staging folder, verify, then move into place.

Verification (a failure is an error, not a warning): the safetensors file loads, holds every
LoRA weight of the in-memory model, all finite, not all zero; and loading the saved adapter
back onto the base reproduces the in-memory model's logits on a probe input.

Atomicity: files are written into ``output_dir/.saving-<pid>`` and moved with os.replace (atomic
per file on one filesystem); the manifest is written last and removed first, so a folder whose
manifest is present always holds a complete, verified adapter. Every file, the manifest included,
is on disk in the staging folder before the first one is moved, so a full disk (one DiskFull line,
files.space_for) leaves the adapter that was in output_dir as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import LorakitError
from ..files import atomic_write_json, atomic_write_text, bytes_on_disk, space_for
from ..runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, STAGING_PREFIX


class AdapterVerificationError(LorakitError):
    exit_code = 1


def clean_stale_staging(output_dir: Path) -> None:
    """Remove staging folders left by a save that was interrupted."""
    for p in Path(output_dir).glob(STAGING_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def verify_adapter(model, folder: Path, probe_ids: torch.Tensor | None, atol: float = 1e-4) -> dict:
    """Check the adapter saved in ``folder`` against the in-memory peft ``model``.

    ``probe_ids=None`` skips the logits comparison: for a model sharded over processes
    (ZeRO-3, FSDP), where no single process holds the weights to compare with."""
    weights_file = folder / ADAPTER_WEIGHTS
    if not weights_file.is_file() or not (folder / ADAPTER_CONFIG).is_file():
        raise AdapterVerificationError(f"{folder}: adapter files were not written")
    saved = load_file(str(weights_file))
    expected = [n for n in _lora_state(model) if ".default." in n or n.endswith(".default")]
    if not saved:
        raise AdapterVerificationError(f"{weights_file}: the saved adapter is empty (no tensors)")
    if len(saved) < len(expected):
        raise AdapterVerificationError(
            f"{weights_file}: holds {len(saved)} tensors but the model has {len(expected)} LoRA weights"
        )
    for name, t in saved.items():
        if not torch.isfinite(t).all():
            raise AdapterVerificationError(f"{weights_file}: tensor {name} holds NaN or inf")
    lora_b = [t for n, t in saved.items() if "lora_B" in n]
    if lora_b and all(float(t.abs().max()) == 0.0 for t in lora_b):
        raise AdapterVerificationError(
            f"{weights_file}: every lora_B weight is zero, so the adapter changes nothing; "
            "training did not update it (check learning_rate, max_steps and the data)"
        )

    # The config, read back as peft reads it, must describe the in-memory adapter.
    from peft import PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict

    saved_cfg = PeftConfig.from_pretrained(str(folder)).to_dict()
    live_cfg = model.peft_config["default"].to_dict()
    for key in (
        "r",
        "lora_alpha",
        "target_modules",
        "bias",
        "use_rslora",
        "use_dora",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
    ):
        a, b = saved_cfg.get(key), live_cfg.get(key)
        if isinstance(a, (list, set)) and isinstance(b, (list, set)):
            a, b = sorted(a), sorted(b)
        if a != b:
            raise AdapterVerificationError(
                f"{folder / ADAPTER_CONFIG}: {key} is {a!r} but the trained adapter has {b!r}"
            )

    if probe_ids is None:
        return {"tensors": len(saved), "max_logit_diff": None, "size_bytes": weights_file.stat().st_size}

    # Logits: the saved tensors loaded into the adapter (peft's own loading code) must give the
    # in-memory model's logits; fp32, no dropout. The live weights are restored whatever happens.
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probe_ids = probe_ids.to(device)
    live = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            ref = model(input_ids=probe_ids).logits.float()
            result = set_peft_model_state_dict(model, saved)
            missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k or "modules_to_save" in k]
            if getattr(result, "unexpected_keys", None) or missing:
                raise AdapterVerificationError(
                    f"{weights_file}: tensor names do not match the model "
                    f"(unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]})"
                )
            got = model(input_ids=probe_ids).logits.float()
    finally:
        set_peft_model_state_dict(model, live)
        model.train(was_training)
    diff = float((ref - got).abs().max())
    if not diff <= atol:
        raise AdapterVerificationError(
            f"{folder}: the saved adapter does not reproduce the trained model (max logit diff {diff:.3g})"
        )
    return {"tensors": len(saved), "max_logit_diff": diff, "size_bytes": weights_file.stat().st_size}


def save_verified_adapter(
    model,
    tokenizer,
    output_dir: Path,
    extra_files: dict[str, str],
    probe_ids: torch.Tensor | None,
    manifest: dict,
    staging: Path | None = None,
) -> dict:
    """Save adapter + tokenizer + extra text files into output_dir, verified and atomic.

    With ``staging`` given, the adapter files are already there (written collectively by
    Trainer.save_model for a sharded model); otherwise the in-memory model writes them."""
    output_dir = Path(output_dir)
    prewritten = staging is not None
    with space_for(output_dir, None if prewritten else adapter_bytes(model, tokenizer, extra_files, output_dir)):
        if not prewritten:
            staging = output_dir / f"{STAGING_PREFIX}{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True, exist_ok=True)
            if not prewritten:
                model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
            for name, text in extra_files.items():
                atomic_write_text(staging / name, text)
            check = verify_adapter(model, staging, probe_ids)
            manifest = {**manifest, "verification": check}
            atomic_write_json(staging / MANIFEST, manifest)  # all of it on disk before anything moves
            (output_dir / MANIFEST).unlink(missing_ok=True)
            for f in sorted(staging.iterdir()):
                if f.name != MANIFEST:
                    os.replace(f, output_dir / f.name)
            os.replace(staging / MANIFEST, output_dir / MANIFEST)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def adapter_bytes(model, tokenizer, extra_files: dict[str, str], near: Path) -> int:
    """About what save_verified_adapter writes, on the file system of ``near``: the adapter weights,
    the extra files and the tokenizer's files in its source folder (a lower bound: peft's config and
    model card, the manifest are left out)."""
    sizes = [sum(p.nbytes for n, p in model.named_parameters() if ".default." in n or n.endswith(".default"))]
    sizes += [len(text.encode("utf-8")) for text in extra_files.values()]
    source = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if source.is_dir():
        sizes += [f.stat().st_size for f in source.glob("tokenizer*") if f.is_file()]
    return bytes_on_disk(sizes, near)
