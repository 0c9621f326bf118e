"""The LoRA fine-tuning recipe. Read it top to bottom: check, data, model, trainer, train, save.

Built on transformers.Trainer (loop, accumulation, schedules, checkpoints, distributed through
accelerate) and peft (LoRA layers, adapter save/load). What lorakit adds: failing early with
clear lines, the data path with label masking, and an adapter saved verified and atomically.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__
from ..config import TrainConfig, dump_config, split_validation
from ..console import info, warn
from ..data.collate import build_collator, require_packing
from ..data.loader import load_examples
from ..data.templates import PromptTemplate, load_template
from ..data.tokenize import ExampleTokenizer
from ..errors import ConfigError, ModelError
from ..files import atomic_write_json, atomic_write_text
from ..models.loading import (
    check_quantization,
    load_model,
    load_tokenizer,
    model_module_names,
    quantization_config,
    resolve_model_path,
    resolve_precision,
)
from ..runfolder import (
    CHECKPOINT_MARKER,
    CONFIG_RECORD,
    EVAL_DIR,
    EVAL_REPORT,
    MANIFEST,
    STAGING_PREFIX,
    TEMPLATE_RECORD,
    TRAIN_LOG,
    checkpoint_step,
    complete_checkpoints,
    incomplete_checkpoints,
)
from .callbacks import CheckpointMarkerCallback, JsonlLogCallback, LiveProgressCallback, LossGuardCallback
from .save import clean_stale_staging, save_verified_adapter
from .trackers import TrackerRuns, send_summary
from .trainer import LorakitTrainer, TrainingDiverged


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import peft
    import transformers

    return {
        "lorakit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
    }


def resolve_target_modules(cfg: TrainConfig, model_path: str, trust_remote_code: bool):
    """Check lora_target_modules against the model's layers on the meta device (no weights
    loaded), so a typo fails in a line that lists the modules the model has."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    available = model_module_names(skeleton)
    linear_names = [
        n for n, m in skeleton.named_modules() if n.rsplit(".", 1)[-1] in available and isinstance(m, torch.nn.Linear)
    ]
    targets = cfg.lora_target_modules
    if targets == "all-linear":
        adapted = linear_names
    elif isinstance(targets, str):  # a regular expression over full module names (peft's rule)
        adapted = [n for n in linear_names if re.fullmatch(targets, n)]
        if not adapted:
            raise ConfigError(
                f"lora_target_modules: the regular expression {targets!r} matches no linear "
                f"module; names look like {linear_names[0]!r}"
            )
    else:
        missing = [m for m in targets if m not in available]
        if missing:
            raise ConfigError(
                f"lora_target_modules: the model has no module named {', '.join(missing)}; "
                f"it has {', '.join(available)} (or use all-linear)"
            )
        adapted = [n for n in linear_names if n.rsplit(".", 1)[-1] in targets]
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(cfg, key):
            # peft's rule: the pattern matches the end of a module name, at a '.' boundary
            if not any(re.match(rf"(.*\.)?({pattern})$", n) for n in adapted):
                raise ConfigError(
                    f"{key}: {pattern!r} matches no adapted module (adapted modules look like {adapted[0]!r})"
                )
    return targets if isinstance(targets, str) else list(targets)


def set_lora_input_cast(model, enabled: bool) -> None:
    """peft's per-layer switch for casting inputs to the LoRA weights' dtype."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


class LoraFinetune:
    """One training run. ``run()`` calls the steps in order."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)

    # 1. Everything that can be checked before any heavy work -------------------------------
    def check(self) -> None:
        cfg = self.cfg
        check_quantization(cfg.load_in_8bit, cfg.load_in_4bit)
        self.precision = resolve_precision(cfg.precision)
        cfg.check_for_training()  # the API's TrainConfig(...): the other key rules ran when it was built
        # world size is how it was launched, not the config: batch_size % micro_batch_size is a config rule
        per_step = cfg.micro_batch_size * world_size()
        if cfg.batch_size % per_step:
            raise ConfigError(
                f"batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size x "
                f"world size ({cfg.micro_batch_size} x {world_size()})"
            )
        self.grad_accum = cfg.batch_size // per_step
        self.report_to = list(dict.fromkeys(cfg.report_to + (["wandb"] if cfg.wandb_project else [])))
        for backend in self.report_to:
            if backend != "tensorboard" and importlib.util.find_spec(backend) is None:
                key = "wandb_project" if backend == "wandb" and cfg.wandb_project else "report_to"
                raise ConfigError(f"{key}: {backend} is not installed (pip install 'lorakit[{backend}]')")
        for path in cfg.eval_data_path:  # a bad eval file fails now, not after hours of training
            load_examples(path)
        self.resume = self._resolve_resume()
        if cfg.prompt_template_name != "chat":
            load_template(cfg.prompt_template_name)  # a bad name fails before the model is pulled

    def _resolve_resume(self):
        """The checkpoint to resume from: the newest *complete* one (see CheckpointMarkerCallback)."""
        cfg, out = self.cfg, self.output_dir
        if cfg.resume_from_checkpoint is True:
            complete = complete_checkpoints(out) if out.is_dir() else []
            if not complete:
                raise ConfigError(f"resume_from_checkpoint: no complete checkpoint-N folder in {out}")
            return str(complete[-1])
        if isinstance(cfg.resume_from_checkpoint, str):
            path = Path(cfg.resume_from_checkpoint)
            if not (path / "trainer_state.json").is_file():
                raise ConfigError(f"resume_from_checkpoint: {path} is not a checkpoint folder (no trainer_state.json)")
            if not (path / CHECKPOINT_MARKER).is_file() and path.parent.resolve() == out.resolve():
                raise ConfigError(
                    f"resume_from_checkpoint: {path} was not completely written (the run died "
                    "while saving it); use resume_from_checkpoint=true for the last complete one"
                )
            return str(path)
        leftovers = [p for p in out.glob("checkpoint-*")] if out.is_dir() else []
        if (out / MANIFEST).exists() or leftovers:
            if not cfg.overwrite_output_dir:
                what = "a trained adapter" if (out / MANIFEST).exists() else "checkpoints of an unfinished run"
                raise ConfigError(
                    f"output_dir: {out} already holds {what}; pass resume_from_checkpoint=true, "
                    "overwrite_output_dir=true, or another output_dir"
                )
        return None

    # 2. Data ---------------------------------------------------------------------------------
    def setup_data(self) -> None:
        cfg = self.cfg
        fmt = None if cfg.data_format == "auto" else cfg.data_format
        self.data = load_examples(cfg.data_path, fmt)
        try:
            self.model_path = resolve_model_path(cfg.base_model)
        except ModelError as e:
            raise ModelError(f"base_model: {e}") from None
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=cfg.trust_remote_code)
        self.template: PromptTemplate = load_template(cfg.prompt_template_name, self.tokenizer)
        self.target_modules = resolve_target_modules(cfg, self.model_path, cfg.trust_remote_code)

        examples = list(self.data.examples)
        n_val = cfg.val_count(len(examples))
        if n_val >= len(examples):
            raise ConfigError(
                f"val_set_size: {cfg.val_set_size} leaves no training examples (the data has {len(examples)})"
            )
        val_examples, train_examples = split_validation(examples, n_val, cfg.seed)
        encode = ExampleTokenizer(
            self.tokenizer,
            self.template,
            cfg.cutoff_len,
            train_on_inputs=cfg.train_on_inputs,
            add_eos_token=cfg.add_eos_token,
        )
        self.train_features, stats = encode.map(train_examples)
        self.val_features, _ = encode.map(val_examples)
        if not self.train_features:
            raise ConfigError(
                f"cutoff_len: {cfg.cutoff_len} leaves no trainable token in any example of {cfg.data_path}"
            )
        self.train_tokens = sum(len(f["input_ids"]) for f in self.train_features)
        info(
            f"data: {len(self.data.examples)} {self.data.format} records from {cfg.data_path} -> "
            f"{len(self.train_features)} train, {len(self.val_features)} validation "
            f"(template {self.template.name})"
        )
        if stats.truncated:
            warn(
                f"{stats.truncated} examples are longer than cutoff_len={cfg.cutoff_len} and were truncated "
                "(their EOS is lost); raise cutoff_len or see `lorakit data check`"
            )
        if stats.dropped:
            warn(f"{stats.dropped} examples had no answer token left within cutoff_len and were dropped")

    # 3. Model --------------------------------------------------------------------------------
    def setup_model(self) -> None:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        cfg = self.cfg
        quantized = cfg.load_in_8bit or cfg.load_in_4bit
        compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        qconfig = quantization_config(cfg.load_in_8bit, cfg.load_in_4bit, compute_dtype)
        # The frozen base is stored in the training precision (bf16/fp16): autocast would otherwise
        # re-cast every frozen fp32 weight at every step, and it halves the memory. The LoRA
        # weights and the optimizer stay fp32 (peft keeps adapter weights fp32).
        base_dtype = compute_dtype if not quantized else torch.float32
        model = load_model(
            self.model_path,
            dtype=base_dtype,
            load_in_8bit=cfg.load_in_8bit,
            load_in_4bit=cfg.load_in_4bit,
            trust_remote_code=cfg.trust_remote_code,
            bnb_config=qconfig,
            device_map={"": int(os.environ.get("LOCAL_RANK", 0))} if quantized else None,
        )
        model.config.use_cache = False
        if quantized:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=self.target_modules,
            bias=cfg.lora_bias,
            use_rslora=cfg.use_rslora,
            use_dora=cfg.use_dora,
            rank_pattern=dict(cfg.rank_pattern),
            alpha_pattern=dict(cfg.alpha_pattern),
            modules_to_save=cfg.modules_to_save or None,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(cfg.seed)  # LoRA A init
        try:
            self.model = get_peft_model(model, lora)
        except ValueError as e:  # e.g. a modules_to_save name the model lacks
            raise ConfigError(f"LoRA settings: {str(e).splitlines()[0][:300]}") from None
        if base_dtype != torch.float32:
            # Everything trained keeps fp32 master weights (peft does so for LoRA weights, not for
            # modules_to_save copies or trained biases of a bf16 base).
            for param in self.model.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()
            # peft casts each bf16 activation to the fp32 LoRA weights' dtype before the LoRA
            # path (a copy per layer, and dropout in fp32). Under autocast the LoRA matmuls run in
            # bf16 anyway, so skip the cast while training; restored before saving/verifying.
            set_lora_input_cast(self.model, enabled=False)
        if cfg.packing:
            require_packing(self.model)  # proves packed examples stay isolated, or stops in one line
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        self.param_counts = {"trainable": trainable, "total": total}
        info(
            f"model: {cfg.base_model} ({total / 1e6:.1f}M parameters), precision {self.precision}; "
            f"trainable LoRA parameters: {trainable:,} ({100 * trainable / total:.3f}%)"
        )

    # 4. Trainer ------------------------------------------------------------------------------
    def setup_trainer(self) -> None:
        from transformers import EarlyStoppingCallback, TrainingArguments
        from transformers.trainer_callback import ProgressCallback

        cfg = self.cfg
        has_val = bool(self.val_features)
        quantized = cfg.load_in_8bit or cfg.load_in_4bit
        if cfg.wandb_project:
            os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)
        if "wandb" in self.report_to:  # Alpaca-LoRA's wandb_watch / wandb_log_model
            if cfg.wandb_watch:
                os.environ.setdefault("WANDB_WATCH", cfg.wandb_watch)
            if cfg.wandb_log_model:
                os.environ.setdefault(
                    "WANDB_LOG_MODEL", "end" if cfg.wandb_log_model == "true" else cfg.wandb_log_model
                )
        warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio
        args = TrainingArguments(
            output_dir=str(self.output_dir),
            per_device_train_batch_size=cfg.micro_batch_size,
            per_device_eval_batch_size=cfg.micro_batch_size,
            gradient_accumulation_steps=self.grad_accum,
            num_train_epochs=cfg.num_epochs,
            max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler_type,
            warmup_steps=warmup,
            weight_decay=cfg.weight_decay,
            bf16=self.precision == "bf16",
            fp16=self.precision == "fp16",
            use_cpu=not torch.cuda.is_available(),
            logging_steps=cfg.logging_steps,
            logging_first_step=True,
            eval_strategy="steps" if has_val else "no",
            eval_steps=cfg.eval_steps,
            save_strategy="steps",
            save_steps=cfg.save_steps,
            save_total_limit=cfg.save_total_limit,
            load_best_model_at_end=has_val and cfg.load_best_model_at_end,
            metric_for_best_model="eval_loss" if has_val else None,
            greater_is_better=False if has_val else None,
            # QLoRA: the paged 8-bit AdamW keeps optimizer state small and survives memory spikes
            optim="paged_adamw_8bit" if quantized else "adamw_torch_fused",
            seed=cfg.seed,
            data_seed=cfg.seed,
            train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
            report_to=self.report_to,
            run_name=cfg.wandb_run_name or None,
            dataloader_num_workers=0,
            ddp_find_unused_parameters=False if world_size() > 1 else None,
            # the loss is divided by the token count of the whole global batch (all processes),
            # so N processes train the same adapter as 1 process with the same batch_size
            average_tokens_across_devices=True,
            remove_unused_columns=False,
            disable_tqdm=not is_main_process(),  # the progress bar with ETA, whatever the log level
        )
        collator = build_collator(self.tokenizer, cfg.packing)
        self.tracker_runs = TrackerRuns()  # keeps the mlflow run open for send_summary
        callbacks = [
            JsonlLogCallback(self.output_dir),
            CheckpointMarkerCallback({CONFIG_RECORD: dump_config(cfg), TEMPLATE_RECORD: self.template.to_json()}),
            LossGuardCallback(cfg.zero_loss_warn_steps, cfg.stop_at_loss),
            self.tracker_runs,
        ]
        if has_val and cfg.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold))
        self.trainer = LorakitTrainer(
            model=self.model,
            args=args,
            train_dataset=self.train_features,
            eval_dataset=self.val_features or None,
            data_collator=collator,
            callbacks=callbacks,
        )
        self.trainer.lora_norms_steps = cfg.lora_norms_steps
        if is_main_process():
            self.trainer.remove_callback(ProgressCallback)
            self.trainer.add_callback(LiveProgressCallback())

    # 5. Train --------------------------------------------------------------------------------
    def train(self) -> None:
        t0 = time.time()
        try:
            result = self.trainer.train(resume_from_checkpoint=self.resume)
        except TrainingDiverged as e:
            set_lora_input_cast(self.model, enabled=True)
            good = complete_checkpoints(self.output_dir)
            keep = (
                f"the last good checkpoint is {good[-1]}; lower learning_rate (or check the data) "
                "and resume with resume_from_checkpoint=true"
                if good
                else "no checkpoint was written yet; lower learning_rate or check the data"
            )
            raise TrainingDiverged(f"{e}; {keep}") from None
        self.wall_s = time.time() - t0
        set_lora_input_cast(self.model, enabled=True)
        self.train_loss = result.training_loss
        state = self.trainer.state
        self.eval_loss = None
        if self.val_features:
            # the adapter that is saved: the best one when load_best_model_at_end loaded it
            evals = [h for h in state.log_history if "eval_loss" in h]
            if self.trainer.args.load_best_model_at_end and state.best_metric is not None:
                self.eval_loss = state.best_metric
            elif evals and evals[-1].get("step") == state.global_step:
                self.eval_loss = evals[-1]["eval_loss"]  # already evaluated at the final step
            else:
                self.eval_loss = self.trainer.evaluate()["eval_loss"]
        self.peak_memory_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        if torch.cuda.is_available():
            self.peak_memory_mib = torch.cuda.max_memory_allocated() / 2**20

    # 6. Save, verified -------------------------------------------------------------------------
    def save(self) -> dict:
        cfg = self.cfg
        state = self.trainer.state
        epochs = state.epoch or 0.0
        tokens_seen = int(self.train_tokens * epochs)  # over the whole run, resumed parts included
        this_run_tokens = self.trainer.tokens_seen * world_size()
        manifest = {
            "lorakit_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_model": cfg.base_model,
            "base_model_path": str(Path(self.model_path).resolve())
            if Path(self.model_path).exists()
            else str(self.model_path),
            "data": {
                "path": str(cfg.data_path),
                "sha256": self.data.sha256,
                "format": self.data.format,
                "records": len(self.data.examples),
                "train_examples": len(self.train_features),
                "val_examples": len(self.val_features),
            },
            "template": self.template.name,
            "precision": self.precision,
            "world_size": world_size(),
            "parameters": self.param_counts,
            "lora": {
                "r": cfg.lora_r,
                "alpha": cfg.lora_alpha,
                "dropout": cfg.lora_dropout,
                "target_modules": self.target_modules,
            },
            "training": {
                "global_steps": state.global_step,
                "epochs": round(epochs, 4),
                "train_loss": self.train_loss,
                "eval_loss": self.eval_loss,
                "best_checkpoint": state.best_model_checkpoint,
                "resumed_from": self.resume,
                "wall_s": round(self.wall_s, 1),
                "tokens_seen": tokens_seen,
                "tokens_per_s": round(this_run_tokens / self.wall_s, 1) if self.wall_s else None,
                "peak_memory_mib": round(self.peak_memory_mib, 1),
                "peak_memory_kind": "cuda_allocated" if torch.cuda.is_available() else "process_rss",
            },
            "libraries": library_versions(),
        }
        extra = {CONFIG_RECORD: dump_config(cfg), TEMPLATE_RECORD: self.template.to_json()}
        if self.sharded():
            # ZeRO-3 / FSDP: each process holds a shard. Trainer.save_model gathers the full
            # adapter (a collective call on every process) and rank 0 writes it; rank 0 then
            # checks the files (the logits check needs the whole model in one process).
            staging = self.output_dir / f"{STAGING_PREFIX}sharded"
            if self.trainer.is_world_process_zero():
                shutil.rmtree(staging, ignore_errors=True)
            self.trainer.accelerator.wait_for_everyone()
            self.trainer.save_model(str(staging))
            if not self.trainer.is_world_process_zero():
                return manifest
            (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the YAML config says it all
            warn(
                "the model is sharded (ZeRO-3/FSDP): the saved adapter's files were checked, "
                "its logits were not compared with the trained model"
            )
            return save_verified_adapter(
                self.model, self.tokenizer, self.output_dir, extra, None, manifest, staging=staging
            )
        if not self.trainer.is_world_process_zero():
            return manifest
        probe = torch.tensor([self.train_features[0]["input_ids"][:32]])
        return save_verified_adapter(self.model, self.tokenizer, self.output_dir, extra, probe, manifest)

    def sharded(self) -> bool:
        return self.trainer.is_sharded()

    def evaluate_adapter(self, manifest: dict) -> dict:
        """`lorakit eval` on eval_data_path: base vs the adapter just saved, report in output_dir/eval."""
        import gc

        from ..eval.runner import evaluate

        self.trainer = self.model = None  # free the training copy before the eval copy loads
        gc.collect()
        out = self.output_dir / EVAL_DIR
        result = evaluate(
            self.cfg.base_model,
            [str(self.output_dir)],
            list(self.cfg.eval_data_path),
            out,
            limit=self.cfg.eval_limit or None,
            max_new_tokens=self.cfg.eval_max_new_tokens,
        )
        info(f"eval report: {out / 'report.html'}")
        manifest = {**manifest, "eval": {"report": str(out / EVAL_REPORT), "scores": result["scores"]}}
        atomic_write_json(self.output_dir / MANIFEST, manifest)
        return manifest

    def _rewind_to(self, checkpoint: str) -> None:
        """Resuming: drop what the killed run wrote after the checkpoint (half-written
        checkpoints, log lines of steps that will be trained again)."""
        step = checkpoint_step(Path(checkpoint))
        for stale in incomplete_checkpoints(self.output_dir):
            shutil.rmtree(stale, ignore_errors=True)
        log = self.output_dir / TRAIN_LOG
        if log.is_file():
            kept = [
                line
                for line in log.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step
            ]
            atomic_write_text(log, "".join(x + "\n" for x in kept))

    def run(self) -> dict:
        self.check()
        self.setup_data()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            clean_stale_staging(self.output_dir)
            if self.cfg.overwrite_output_dir and self.resume is None:
                for old in self.output_dir.glob("checkpoint-*"):
                    shutil.rmtree(old, ignore_errors=True)
                (self.output_dir / TRAIN_LOG).unlink(missing_ok=True)
            if self.resume is not None:
                self._rewind_to(self.resume)
            if not (self.cfg.overwrite_output_dir and self.resume is None and (self.output_dir / MANIFEST).is_file()):
                atomic_write_text(self.output_dir / CONFIG_RECORD, dump_config(self.cfg))
            # else the top level still holds the earlier run's finished adapter, whose record this is
            # until the final save replaces them together; this run's checkpoints carry their own
        self.setup_model()
        self.setup_trainer()
        self.train()
        manifest = self.save()
        if self.cfg.eval_data_path and is_main_process():
            manifest = self.evaluate_adapter(manifest)
        if is_main_process():
            send_summary(manifest, self.report_to, self.tracker_runs)  # the manifest's figures to mlflow / wandb
        t = manifest["training"]
        info(
            f"done: {t['global_steps']} steps in {t['wall_s']}s, {t['tokens_seen']:,} tokens seen, "
            f"{t['tokens_per_s']} tokens/s, peak memory {t['peak_memory_mib']:.0f} MiB; train loss "
            f"{t['train_loss']:.4f}"
            + (f", eval loss {t['eval_loss']:.4f}" if t["eval_loss"] is not None else "")
            + (f" (best: {Path(t['best_checkpoint']).name})" if t.get("best_checkpoint") else "")
            + f". Adapter verified and saved to {self.output_dir}"
        )
        return manifest


def train(cfg: TrainConfig) -> dict:
    return LoraFinetune(cfg).run()
