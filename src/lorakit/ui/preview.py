"""What the Train tab shows before a run: one record as the model will see it (the template
applied, the part that counts in the loss marked), and the layers LoRA can target.

Both only read models that are already on this machine: a base model that still has to be
fetched is never downloaded for a preview (training fetches it)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..data.loader import load_examples
from ..data.templates import load_template
from ..data.tokenize import ExampleTokenizer
from ..errors import LorakitError
from ..models.registry import ALIASES, list_cached

TRAINED = "trained (in the loss)"
# LLaMA-style layer names (SmolLM2, Llama, Mistral, Qwen): offered until the model is on disk.
DEFAULT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def local_model_path(base: str) -> str | None:
    """The model folder when ``base`` is on this machine (a folder, or an alias already fetched)."""
    path = Path(base or "").expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    if base in ALIASES:
        for model in list_cached():
            if model.name == base:
                return str(model.path)
    return None


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from ..models.loading import load_tokenizer

    return load_tokenizer(path)


@lru_cache(maxsize=8)
def _modules(path: str) -> tuple[str, ...]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.loading import model_module_names

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():  # the layer names without loading a weight
        skeleton = AutoModelForCausalLM.from_config(config)
    return tuple(model_module_names(skeleton))


def target_module_choices(base: str) -> list[str]:
    """Names of the layers LoRA can adapt in ``base`` (a LLaMA-style default while it is not local)."""
    path = local_model_path(base)
    if path is None:
        return list(DEFAULT_MODULES)
    try:
        names = list(_modules(path))
    except (OSError, ValueError, KeyError):
        return list(DEFAULT_MODULES)
    order = {n: i for i, n in enumerate(DEFAULT_MODULES)}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def preview_record(
    data_path: str | Path,
    template_name: str,
    base_model: str,
    index: int = 0,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
) -> tuple[list[tuple[str, str | None]], str]:
    """Record ``index`` rendered by the template: [(text, TRAINED or None)], and one line about
    it (format, records, tokens in the loss, truncation). Raises LorakitError for bad data or
    an unknown template."""
    data = load_examples(data_path)
    if not data.examples:
        raise LorakitError(f"{Path(data_path).name}: holds no records")
    index = min(max(int(index or 0), 0), len(data.examples) - 1)
    example = data.examples[index]
    model_path = local_model_path(base_model)
    tokenizer = _tokenizer(model_path) if model_path else None
    if template_name == "chat" and tokenizer is None:
        raise LorakitError(
            "template chat: the preview needs the base model's tokenizer, which is not on this "
            "machine yet (training fetches it); preview with alpaca, or train once"
        )
    template = load_template(template_name, tokenizer)
    segments = [
        (s.text, TRAINED if (s.trained or train_on_inputs) else None) for s in template.render(example, tokenizer)
    ]
    line = f"record {index + 1} of {len(data.examples)} ({data.format}, template {template.name})"
    if tokenizer is not None:
        encode = ExampleTokenizer(
            tokenizer, template, cutoff_len, train_on_inputs=train_on_inputs, add_eos_token=add_eos_token
        )
        ids, labels = encode.full_ids(example)
        trained = sum(1 for x in labels[:cutoff_len] if x != -100)
        if (
            add_eos_token
            and tokenizer.eos_token_id in ids
            and not any(tokenizer.eos_token in text for text, _ in segments)
        ):
            segments.append((tokenizer.eos_token, TRAINED))
        line += f": {len(ids)} tokens, {trained} in the loss"
        if len(ids) > cutoff_len:
            line += (
                f"; longer than cutoff_len {cutoff_len}, so the end of the answer and its EOS are cut off"
                if trained
                else f"; its prompt alone fills cutoff_len {cutoff_len}, so it is dropped"
            )
    elif add_eos_token and any(label for _, label in segments):
        segments.append(("<eos>", TRAINED))
        line += " (token counts appear once the base model is on this machine)"
    return segments, line
