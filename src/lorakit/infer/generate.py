"""Generation with a base model and, optionally, a LoRA adapter on top.

One model in memory: the adapter is applied with peft, and ``use_adapter=False`` runs the base
through ``disable_adapter()`` so ``--compare`` needs no second copy. Prompts are built by the
same template object training used (recorded in the adapter folder), and tokenized the same way.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.records import Turn
from ..data.templates import PromptTemplate, load_template, template_for_folder
from ..data.tokenize import encode_prompt
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from ..models.registry import DEFAULT_BASE_MODEL
from ..runfolder import recorded_base_model  # noqa: F401 - re-exported
from .adapters import check_adapter_dir, load_adapter  # noqa: F401 - check_adapter_dir re-exported

DEFAULT_ADAPTER_NAME = "default"  # the name the first adapter has, as with PeftModel.from_pretrained


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 50
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int | None = None

    def to_kwargs(self, tokenizer) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                  repetition_penalty=self.repetition_penalty,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw


class Generator:
    def __init__(self, base: str | None = None, adapter: str | None = None, template: str | None = None,
                 dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        self.adapter_dir = check_adapter_dir(adapter) if adapter else None
        self.base = base or (recorded_base_model(self.adapter_dir) if self.adapter_dir else None) or DEFAULT_BASE_MODEL
        model_path = resolve_model_path(self.base)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        model = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        if torch.cuda.is_available():  # generate, chat and eval run on the GPU when there is one
            model = model.to("cuda")
        if self.adapter_dir is not None:  # float or int8 folder; a mismatch is one ModelError line
            model = load_adapter(model, self.adapter_dir, DEFAULT_ADAPTER_NAME)
        model.eval()
        self.model = model
        self.template = self._pick_template(template, model_path)

    def _pick_template(self, name: str | None, model_path: str) -> PromptTemplate:
        if name:
            return load_template(name, self.tokenizer)
        for folder in (self.adapter_dir, Path(model_path)):
            if folder is not None and folder.is_dir():
                recorded = template_for_folder(folder)
                if recorded is not None:
                    return recorded
        return load_template("alpaca")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_ids(self, instruction: str, input: str = "", history: list[Turn] | None = None,
                   system: str = "") -> list[int]:
        prompt = self.template.build_prompt(instruction, input=input, history=history, system=system,
                                            tokenizer=self.tokenizer)
        return encode_prompt(self.tokenizer, prompt)

    def _adapter_context(self, use_adapter: bool):
        if self.adapter_dir is None or use_adapter:
            return nullcontext()
        return self.model.disable_adapter()

    @torch.no_grad()
    def generate(self, instruction: str, input: str = "", history: list[Turn] | None = None,
                 system: str = "", params: GenerationParams | None = None, streamer=None,
                 use_adapter: bool = True) -> str:
        params = params or GenerationParams()
        if params.seed is not None:
            torch.manual_seed(params.seed)
        ids = torch.tensor([self.prompt_ids(instruction, input, history, system)], device=self.device)
        with self._adapter_context(use_adapter):
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                      **params.to_kwargs(self.tokenizer))
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate_batch(self, instructions: list[str], inputs: list[str] | None = None,
                       params: GenerationParams | None = None, use_adapter: bool = True,
                       batch_size: int = 8) -> list[str]:
        """Greedy/sampled answers for many prompts, left-padded batches."""
        params = params or GenerationParams()
        inputs = inputs or [""] * len(instructions)
        pad = self.tokenizer.pad_token_id
        answers: list[str] = []
        self.last_new_tokens: list[int] = []  # per answer, for throughput figures
        for start in range(0, len(instructions), batch_size):
            chunk = [self.prompt_ids(q, i) for q, i in
                     zip(instructions[start:start + batch_size], inputs[start:start + batch_size])]
            width = max(len(c) for c in chunk)
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=self.device)
            if params.seed is not None:
                torch.manual_seed(params.seed)
            with self._adapter_context(use_adapter):
                out = self.model.generate(input_ids=ids, attention_mask=mask, **params.to_kwargs(self.tokenizer))
            answers += [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
            self.last_new_tokens += [self._generated_length(row[width:]) for row in out]
        return answers

    def _generated_length(self, new_ids: torch.Tensor) -> int:
        """Tokens generated for one row: up to and including the first EOS."""
        eos = (new_ids == self.tokenizer.eos_token_id).nonzero()
        return int(eos[0, 0]) + 1 if len(eos) else int(new_ids.numel())
