"""The one typed training config.

Keys are Alpaca-LoRA's (``finetune.py``) plus what a modern trainer needs. Every field documents
itself: ``lorakit train --help-config`` prints them. A config is a YAML file plus ``key=value``
overrides; unknown keys and invalid values fail in one line before any model is loaded.
"""

from __future__ import annotations

import random
import re
import reprlib
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

_REGEX_CHARS = set("*+?^$|()[]{}\\")


def is_regex(target: str) -> bool:
    """lora_target_modules given as one string with regex characters is a regular expression."""
    return bool(_REGEX_CHARS & set(target))


SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "inverse_sqrt", "polynomial")


class TrainConfig(BaseModel):
    """Everything a training run needs. Defaults follow Alpaca-LoRA where it has one."""

    # allow_inf_nan: every number here is a count, a rate or a size; .inf or .nan in YAML is a mistake
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # --- model -----------------------------------------------------------------------------
    base_model: str = Field(
        "smollm2-135m",
        description="Base model: a local Hugging Face model folder, a .gguf file, a built-in "
        "alias (smollm2-135m) or a hub id org/name (needs network).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Training precision. auto = bf16 autocast where the CPU/GPU supports "
        "it, else fp32. fp16 needs CUDA.",
    )
    load_in_8bit: bool = Field(
        False, description="Load the frozen base in 8-bit (bitsandbytes, CUDA only; not with load_in_4bit)."
    )
    load_in_4bit: bool = Field(
        False, description="QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes, CUDA only; not with load_in_8bit)."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub to run. Off: safe by default.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")

    # --- data ------------------------------------------------------------------------------
    data_path: str = Field(
        "",
        description="Training data: .json, .jsonl, .csv or .parquet "
        "(Alpaca, Dolly, messages, ShareGPT or text records). Required to train.",
    )
    data_format: Literal["auto", "alpaca", "dolly", "messages", "sharegpt", "qa", "text"] = Field(
        "auto", description="Record shape; auto detects it from the first record."
    )
    prompt_template_name: str = Field(
        "alpaca",
        description="Prompt template: alpaca, alpaca_short, alpaca_legacy, chat (the "
        "tokenizer's own chat template) or a path to an Alpaca-LoRA template JSON file.",
    )
    cutoff_len: int = Field(
        256,
        gt=0,
        description="Max tokens per example; longer ones are "
        "truncated (their EOS is lost, so keep cutoff above most examples).",
    )
    val_set_size: float = Field(
        0, ge=0, description="Held-out examples for eval loss: a count (>= 1) or a fraction (< 1). 0 = none."
    )
    train_on_inputs: bool = Field(
        False, description="Train on prompt tokens too. False = only the response tokens count in the loss."
    )
    add_eos_token: bool = Field(
        True, description="Append EOS after each trained response so the model learns to stop."
    )
    group_by_length: bool = Field(False, description="Batch examples of similar length together (less padding).")

    # --- LoRA ------------------------------------------------------------------------------
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Modules to adapt: a list of names, a regular expression matched against full module "
        "names (e.g. '.*layers\\.(0|1)\\..*_proj'), or 'all-linear' for every linear layer but the output head.",
    )

    lora_bias: Literal["none", "lora_only", "all"] = Field(
        "none", description="Which biases to train: none, lora_only (of adapted layers) or all."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale = alpha / sqrt(r).")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (magnitude + direction).")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="Per-layer ranks, {regex or name: r}, e.g. {'layers\\.0\\..*': 16} (layered LoRA).",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Per-layer alphas, {regex or name: alpha}."
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained fully and saved with the adapter (e.g. lm_head, embed_tokens).",
    )

    # --- optimisation ----------------------------------------------------------------------
    output_dir: str = Field("./lora-out", description="Where the adapter, logs and checkpoints go.")
    overwrite_output_dir: bool = Field(
        False, description="Allow training into an output_dir that already holds a trained adapter."
    )
    batch_size: int = Field(
        128,
        gt=0,
        description="Global batch size per optimizer step; a multiple of "
        "micro_batch_size (x world size when launched on several processes).",
    )
    micro_batch_size: int = Field(
        4,
        gt=0,
        description="Examples per forward pass per process; "
        "gradient accumulation = batch_size / micro_batch_size / world size.",
    )
    num_epochs: float = Field(3, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1 = use num_epochs).")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate.")
    lr_scheduler_type: Literal[SCHEDULERS] = Field(
        "linear", description="Learning-rate schedule: " + ", ".join(SCHEDULERS) + "."
    )  # type: ignore[valid-type]
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warm-up as a share of all steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    seed: int = Field(
        42, ge=0, le=2**32 - 1, description="Random seed for data order, LoRA init and dropout (0 to 2**32 - 1)."
    )

    packing: bool = Field(
        False,
        description="Padding-free batches: examples packed end to end, "
        "attention kept within each example. Saves the compute spent on padding.",
    )

    # --- stopping and guards ---------------------------------------------------------------
    early_stopping_patience: int = Field(
        0,
        ge=0,
        description="Stop after this many evaluations without eval-loss improvement "
        "(0 = off; needs val_set_size > 0).",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, description="Minimum eval-loss improvement that counts (min delta)."
    )
    load_best_model_at_end: bool = Field(
        True,
        description="With validation, end with the adapter of the best eval loss (not the last step); "
        "save_steps must then be a multiple of eval_steps, so the best evaluation has a checkpoint.",
    )
    stop_at_loss: float = Field(
        0.0, ge=0, description="Stop when the logged train loss falls to this value (0 = off)."
    )
    zero_loss_warn_steps: int = Field(
        3,
        ge=1,
        description="Warn when the train loss is exactly 0 for this many logs in a row "
        "(usually a label-masking mistake).",
    )

    # --- evaluation after training ---------------------------------------------------------
    eval_data_path: list[str] | str = Field(
        default_factory=list,
        description="Eval set(s) to run `lorakit eval` on after training (base vs "
        "the new adapter); the report goes to output_dir/eval.",
    )
    eval_limit: int = Field(0, ge=0, description="Evaluate only the first N examples of each eval set (0 = all).")
    eval_max_new_tokens: int = Field(256, gt=0, description="Most tokens generated per eval answer.")

    # --- logging / saving ------------------------------------------------------------------
    logging_steps: int = Field(10, gt=0, description="Log train loss every N steps.")
    eval_steps: int = Field(
        200,
        gt=0,
        description="Evaluate on the validation set every N steps. Set only "
        "save_steps and evaluation follows it (eval_steps = save_steps).",
    )
    save_steps: int = Field(
        200,
        gt=0,
        description="Write a checkpoint every N steps. Set only eval_steps and "
        "checkpoints follow it (save_steps = eval_steps); set both and, with val_set_size "
        "and load_best_model_at_end, save_steps must be a multiple of eval_steps.",
    )
    save_total_limit: int = Field(3, gt=0, description="Keep at most this many checkpoints.")
    resume_from_checkpoint: bool | str | None = Field(
        None, description="true = resume from the last checkpoint in output_dir; a path = that checkpoint."
    )

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where metrics go besides train_log.jsonl: "
        "tensorboard (in output_dir/runs), wandb, mlflow (each must be installed).",
    )
    lora_norms_steps: int = Field(
        0,
        ge=0,
        description="Log per-layer LoRA A, B and B·A norms to TensorBoard every N steps (0 = every logging_steps).",
    )

    # --- Alpaca-LoRA compatibility (Weights & Biases) ----------------------------------------
    wandb_project: str = Field("", description="W&B project; set to log to Weights & Biases (needs wandb installed).")
    wandb_run_name: str = Field("", description="W&B run name.")
    wandb_watch: str = Field("", description="W&B watch mode (false | gradients | all).")
    wandb_log_model: str = Field("", description="W&B model logging (false | true).")

    # --- validators ------------------------------------------------------------------------
    @field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, v):
        if isinstance(v, str):
            if v == "all-linear":
                return v
            if is_regex(v):  # peft matches a string target against full module names
                _check_regex(v)
                return v
            # "q_proj,v_proj" from the command line
            v = [s.strip() for s in v.split(",") if s.strip()]
        if not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v

    @field_validator(
        "base_model",
        "data_path",
        "prompt_template_name",
        "output_dir",
        "wandb_project",
        "wandb_run_name",
        "wandb_watch",
        "wandb_log_model",
        mode="before",
    )
    @classmethod
    def _text(cls, v):
        # YAML reads `true` or `2024` as a bool or a number; in a text field they mean the text
        # (wandb_log_model: true, wandb_run_name: 1, output_dir: 2024).
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        return v

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, v, info):
        for key, value in v.items():  # peft matches each key as a regular expression against module names
            _check_regex(key, f"key {key!r}: ")
            if info.field_name == "rank_pattern" and value < 1:
                raise ValueError(f"key {key!r}: a rank must be at least 1, got {value}")
        return v

    @field_validator("eval_data_path", mode="before")
    @classmethod
    def _eval_paths(cls, v):
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v or []

    @field_validator("resume_from_checkpoint", mode="before")
    @classmethod
    def _resume(cls, v):
        if isinstance(v, str) and v.lower() in ("true", "false", "none", ""):
            return {"true": True, "false": None, "none": None, "": None}[v.lower()]
        return v or None

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v):
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip() and s.strip() != "none"]
        return v

    @model_validator(mode="after")
    def _rules(self):
        """Every rule across keys that needs no hardware and no files, so the CLI, the UI form and
        the API refuse a bad config before any process starts. Each message names its keys."""
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit: choose one")
        if self.early_stopping_patience and not self.val_set_size:
            raise ValueError(
                f"early_stopping_patience ({self.early_stopping_patience}) needs a validation set: "
                "set val_set_size (a count, or a fraction below 1) or early_stopping_patience=0"
            )
        # The key the user did not set follows the one they did (model_fields_set: what was
        # given, or assigned since), so save and eval intervals align without a second key.
        explicit = self.model_fields_set
        save_steps, eval_steps = self.save_steps, self.eval_steps
        if "save_steps" in explicit and "eval_steps" not in explicit:
            eval_steps = save_steps
        elif "eval_steps" in explicit and "save_steps" not in explicit:
            save_steps = eval_steps
        if self.val_set_size and self.load_best_model_at_end and save_steps % eval_steps:
            raise ValueError(
                f"save_steps ({save_steps}) must be a multiple of eval_steps ({eval_steps}) so the "
                "best evaluation has a checkpoint; set only one of them (the other follows it), or "
                "load_best_model_at_end=false"
            )
        # __dict__: not an assignment, which would validate again (and mark the key as set)
        self.__dict__.update(save_steps=save_steps, eval_steps=eval_steps)
        # YAML reads 0x... numbers of any length; no trainer, and no config record, takes one past 64 bits
        for name, value in self.__dict__.items():
            for number in value.values() if isinstance(value, dict) else [value]:
                if isinstance(number, int) and not -(2**63) <= number < 2**63:
                    raise ValueError(f"{name}: a number too large (more than 64 bits)")
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        # validate_assignment: a rule across keys fails after pydantic has stored the value; put
        # the config back as it was, so a refused assignment changes nothing.
        if name not in type(self).model_fields:
            return super().__setattr__(name, value)
        before, fields_set = dict(self.__dict__), set(self.__pydantic_fields_set__)
        try:
            super().__setattr__(name, value)
        except ValidationError:
            self.__dict__.clear()
            self.__dict__.update(before)
            object.__setattr__(self, "__pydantic_fields_set__", fields_set)
            raise

    def check_for_training(self, source: str = "config") -> TrainConfig:
        """The one rule only a training run has: a data_path. (A config without one is still a
        config: the UI form's defaults, config-help, a template.) Raises ConfigError in the same
        one line as every other config error; returns the config."""
        if not self.data_path.strip():
            raise ConfigError(f"{source}: data_path: required (a .json, .jsonl, .csv or .parquet file)")
        return self

    # --- helpers ---------------------------------------------------------------------------
    @field_validator("val_set_size")
    @classmethod
    def _val_size(cls, v):
        if v >= 1 and v != int(v):
            raise ValueError("must be a count of examples (a whole number >= 1) or a fraction below 1")
        return v

    def val_count(self, n_examples: int) -> int:
        """val_set_size as a number of examples."""
        return val_count(self.val_set_size, n_examples)


def _check_regex(pattern: str, what: str = "") -> None:
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:  # a{99999999999}; thousands of nested groups
        reason = "groups nested too deeply" if isinstance(e, RecursionError) else e
        raise ValueError(f"{what}not a valid regular expression: {reason}") from None


_SHOWN = reprlib.Repr()  # a bad value in an error line: bounded, whatever its size or depth
_SHOWN.maxstring = _SHOWN.maxother = 200
_SHOWN.maxlevel = 3


def _shown(value) -> str:
    if isinstance(value, int) and value.bit_length() > 64:  # past sys.get_int_max_str_digits() it has no repr
        return f"a {value.bit_length()}-bit number"
    try:
        return _SHOWN.repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"


def _number_problem(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "lists or mappings nested too deeply"
    if "integer string conversion" in str(error):
        return f"a number with more than {sys.get_int_max_str_digits()} digits"
    return " ".join(str(error).split())


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    # loc is (key,) or (key, 'list[str]', ...) for union fields: the key is what the user wrote
    key = str(first["loc"][0]) if first["loc"] else "config"
    if first["type"] == "extra_forbidden":
        known = ", ".join(sorted(TrainConfig.model_fields))
        return f"{source}: unknown key {key!r} (known keys: {known})"  # repr: a key may hold a line break
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {_shown(value)})"
    if key == "config":  # model-level check: the message names its keys
        return f"{source}: {msg}"
    return f"{source}: {key}: {msg}{shown}"


def parse_override(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError, ValueError):  # ValueError: 2024-13-01, a 5000-digit number
        value = raw
    return key, value


def load_config(path: str | Path | None, overrides: list[str] | None = None, for_training: bool = True) -> TrainConfig:
    """Read a YAML config, apply key=value overrides, validate. Errors name the file and key.
    for_training (the default: this is what `lorakit train` reads) also requires data_path."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            if not path.is_file():
                raise ConfigError(f"{path}: config file not found")
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid UTF-8 text") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the file: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
            problem = " ".join(problem.split())  # one line, whatever YAML quotes
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
        except (RecursionError, ValueError) as e:  # a date like 2024-13-01; a number past Python's digit limit
            raise ConfigError(f"{path}: invalid YAML: {_number_problem(e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value, found {type(loaded).__name__}")
        # a key YAML reads as a number, a date or null (1: x, null: y) is still a key name: unknown
        data.update({k if isinstance(k, str) else str(k): v for k, v in loaded.items()})
    for item in overrides or []:
        key, value = parse_override(item)
        field = TrainConfig.model_fields.get(key)
        if field is not None and field.annotation is str and not isinstance(value, str):
            value = item.split("=", 1)[1].strip()  # a text field takes the text as typed (output_dir=0123)
        data[key] = value
    try:
        cfg = TrainConfig(**data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    return cfg.check_for_training(source) if for_training else cfg


def config_help() -> str:
    """Every key with its default and meaning (the config is the documentation)."""
    lines = []
    for name, f in TrainConfig.model_fields.items():
        default = f.default_factory() if f.default_factory else f.default
        lines.append(f"{name} (default {default!r}): {f.description}")
    return "\n".join(lines)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def val_count(val_set_size: float, n_examples: int) -> int:
    """val_set_size (a count, or a fraction below 1; 0 = none) as a number of examples."""
    if not val_set_size or val_set_size <= 0:
        return 0
    if val_set_size < 1:
        return max(1, int(round(n_examples * val_set_size)))
    return int(val_set_size)


def split_validation(examples: list, n_val: int, seed: int) -> tuple[list, list]:
    """(validation, training): the one split training makes (and export verification re-makes):
    with a validation set, the examples shuffled by ``seed``, the first ``n_val`` held out."""
    examples = list(examples)
    if n_val:
        random.Random(seed).shuffle(examples)
    return examples[:n_val], examples[n_val:]
