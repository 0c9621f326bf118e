"""Turn a ``base_model`` setting into a loaded tokenizer and model, failing early with one clear line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError
from .registry import ALIASES, pull

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_OFFLINE_HINT = "Offline? Hub ids need network access; use a local folder, a .gguf file or " + " or ".join(ALIASES)


def _looks_like_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1:  # lorakit asks for org/name; a bare name is more likely a typo'd path
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model_path(base_model: str) -> str:
    """A local model folder, a .gguf file (converted once), an alias (pulled once) or a hub id."""
    aliases = ", ".join(ALIASES)
    try:
        path = Path(base_model).expanduser()
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, RuntimeError) as e:  # a name too long for the file system; ~user of no user
        raise ModelError(f"{base_model!r} is not a usable path ({getattr(e, 'strerror', None) or e})") from None
    if is_dir:
        if (path / "config.json").is_file():
            return str(path)
        raise ModelError(
            f"{path} is a folder but holds no config.json; point base_model at a Hugging Face "
            f"model folder, a .gguf file or a built-in alias ({aliases})"
        )
    if is_file:
        if path.suffix.lower() == ".gguf":
            return str(pull(str(path)))
        raise ModelError(
            f"{path} is a file but not a .gguf model; point base_model at a model folder "
            f"(with config.json), a .gguf file or a built-in alias ({aliases})"
        )
    if base_model in ALIASES:
        return str(pull(base_model))
    if path.suffix.lower() == ".gguf":
        raise ModelError(f"{path}: no such .gguf file")
    if _looks_like_hub_id(base_model):
        return base_model  # transformers fetches it at load time, where the network allows
    raise ModelError(
        f"{base_model!r} is not a model folder, a .gguf file, a built-in alias ({aliases}) or a hub id org/name"
    )


def _cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_bf16() -> bool:
    # Without native bf16 instructions torch emulates bf16 on CPU, which is slower than fp32.
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def resolve_precision(precision: str) -> str:
    """``auto``/``fp32``/``bf16``/``fp16`` -> the precision this machine trains in: fp32, bf16 or fp16."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: unknown value {precision!r}; use one of {', '.join(PRECISIONS)}")
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return precision


def check_quantization(load_in_8bit: bool, load_in_4bit: bool) -> None:
    """Fail before any model is loaded when 8/4-bit loading cannot work here."""
    if load_in_8bit and load_in_4bit:
        raise ConfigError("load_in_8bit and load_in_4bit are both set; set at most one")
    if not (load_in_8bit or load_in_4bit):
        return
    key = "load_in_4bit" if load_in_4bit else "load_in_8bit"
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{key} needs a CUDA GPU and bitsandbytes; this machine has no CUDA device. Remove {key} or run on a GPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{key} needs bitsandbytes, which is not installed: pip install bitsandbytes")


def quantization_config(load_in_8bit: bool, load_in_4bit: bool, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig for QLoRA (4-bit NF4, double quantization) or 8-bit; None for neither."""
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _load_error(what: str, path_or_id: str, error: Exception) -> ModelError:
    """One line: what failed, the first line of why, and the offline hint for hub ids."""
    text = str(error).strip()
    reason = text.splitlines()[0].rstrip(".") if text else type(error).__name__
    hint = f" {_OFFLINE_HINT}" if _looks_like_hub_id(path_or_id) and not Path(path_or_id).exists() else ""
    return ModelError(f"could not load {what} for {path_or_id!r}: {reason}.{hint}")


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False):
    """The tokenizer, with a pad token (EOS when it has none) and right padding for training."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # hub errors are OSErrors
        raise _load_error("tokenizer", path_or_id, e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _refuse_pickle_only(folder: Path) -> None:
    has_safetensors = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles and not has_safetensors:
        raise ModelError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); lorakit loads only safetensors because "
            "loading a pickle file can run arbitrary code. If you trust the file, convert it once: python -c "
            f"\"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{folder}')"
            f".save_pretrained('{folder}')\""
        )


def load_model(
    path_or_id: str,
    dtype: torch.dtype = torch.float32,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    device_map=None,
    *,
    bnb_config=None,
):
    """The causal LM from safetensors weights, optionally 8/4-bit quantized.

    ``bnb_config`` overrides the BitsAndBytesConfig built from the flags (whose compute dtype is ``dtype``).
    """
    from transformers import AutoModelForCausalLM

    local = Path(path_or_id).expanduser()
    if local.is_dir():
        _refuse_pickle_only(local)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    bnb_config = bnb_config or quantization_config(load_in_8bit, load_in_4bit, dtype)
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(path_or_id, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error("model", path_or_id, e) from e


def model_module_names(model) -> list[str]:
    """Names (last component) of the layers LoRA can target: Linear and GPT-2 style Conv1D, not the output head."""
    try:
        from transformers.pytorch_utils import Conv1D

        layer_types = (torch.nn.Linear, Conv1D)
    except ImportError:
        layer_types = (torch.nn.Linear,)
    # The output head maps to the vocabulary; adapting it is not what lora_target_modules is for.
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, layer_types) and module is not head
    }
    names.discard("lm_head")
    return sorted(names)
