"""Generation with a base model and, optionally, a LoRA adapter on top.

One model in memory: the adapter is applied with peft, and ``use_adapter=False`` runs the base
through ``disable_adapter()`` so ``--compare`` needs no second copy. The template comes from the
one template policy (``resolve_template``): the adapter's recorded one, which the base shares in a
comparison; a base alone uses its own chat template. Generation stops at the template's turn
markers as well as at EOS (``generate_kwargs``, ``answer_text``), in every path that generates.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..data.records import Turn
from ..data.templates import Stops, resolve_template
from ..data.tokenize import encode_prompt
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from ..models.registry import DEFAULT_BASE_MODEL
from ..runfolder import recorded_base_model
from .adapters import check_adapter_dir, load_adapter
from .stops import StopIteratorStreamer, StopTextStreamer, cut_at_stop

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
        kw = dict(
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw


def generate_kwargs(params: GenerationParams, tokenizer, stops: Stops) -> dict:
    """transformers ``generate`` arguments: the sampling parameters, EOS plus the template's
    marker tokens, and its marker strings (``stop_strings``)."""
    kw = params.to_kwargs(tokenizer)
    kw["eos_token_id"] = stops.eos_ids(tokenizer)
    if stops.strings:
        kw.update(stop_strings=list(stops.strings), tokenizer=tokenizer)
    return kw


def answer_text(tokenizer, new_ids, stops: Stops) -> str:
    """Generated ids -> the answer: decoded without special tokens, cut at the first marker."""
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return cut_at_stop(text, stops.strings)[0].strip()


def prompt_ids_for(
    template, tokenizer, instruction: str, input: str = "", history: list[Turn] | None = None, system: str = ""
) -> list[int]:
    """The token ids a model is prompted with: the one way every path (generate, chat, eval,
    serve, the UI) turns a message and its history into ids."""
    prompt = template.build_prompt(instruction, input=input, history=history, system=system, tokenizer=tokenizer)
    return encode_prompt(tokenizer, prompt)


class Generator:
    def __init__(
        self,
        base: str | None = None,
        adapter: str | None = None,
        template: str | None = None,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        prepare_base=None,
    ):
        """``prepare_base`` (export verification): called with the base model before the adapter
        is applied, e.g. to give it the de-quantized 4-bit weights a QLoRA adapter trained on."""
        self.adapter_dir = check_adapter_dir(adapter) if adapter else None
        self.base = base or (recorded_base_model(self.adapter_dir) if self.adapter_dir else None) or DEFAULT_BASE_MODEL
        model_path = resolve_model_path(self.base)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        model = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        if torch.cuda.is_available():  # generate, chat and eval run on the GPU when there is one
            model = model.to("cuda")
        if prepare_base is not None:
            prepare_base(model)
        if self.adapter_dir is not None:  # float or int8 folder; a mismatch is one ModelError line
            model = load_adapter(model, self.adapter_dir, DEFAULT_ADAPTER_NAME)
        model.eval()
        self.model = model
        # with an adapter, its template serves the base too (--compare, eval): the same prompt for both
        self.template = resolve_template(
            name=template, adapter=self.adapter_dir, model_path=model_path, tokenizer=self.tokenizer
        )
        self.stops = self.template.stops(self.tokenizer)

    def streamer(self, iterator: bool = False, **kwargs):
        """A streamer (terminal, or an iterator for a thread) that stops at the template's markers."""
        cls = StopIteratorStreamer if iterator else StopTextStreamer
        return cls(self.tokenizer, self.stops.strings, skip_prompt=True, skip_special_tokens=True, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_ids(
        self, instruction: str, input: str = "", history: list[Turn] | None = None, system: str = ""
    ) -> list[int]:
        return prompt_ids_for(self.template, self.tokenizer, instruction, input, history, system)

    def _adapter_context(self, use_adapter: bool):
        if self.adapter_dir is None or use_adapter:
            return nullcontext()
        return self.model.disable_adapter()

    @torch.no_grad()
    def generate(
        self,
        instruction: str,
        input: str = "",
        history: list[Turn] | None = None,
        system: str = "",
        params: GenerationParams | None = None,
        streamer=None,
        use_adapter: bool = True,
    ) -> str:
        params = params or GenerationParams()
        if params.seed is not None:
            torch.manual_seed(params.seed)
        ids = torch.tensor([self.prompt_ids(instruction, input, history, system)], device=self.device)
        with self._adapter_context(use_adapter):
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                streamer=streamer,
                **generate_kwargs(params, self.tokenizer, self.stops),
            )
        return answer_text(self.tokenizer, out[0, ids.shape[1] :], self.stops)

    @torch.no_grad()
    def generate_batch(
        self,
        instructions: list[str],
        inputs: list[str] | None = None,
        params: GenerationParams | None = None,
        use_adapter: bool = True,
        batch_size: int = 8,
    ) -> list[str]:
        """Greedy/sampled answers for many prompts, left-padded batches."""
        params = params or GenerationParams()
        inputs = inputs or [""] * len(instructions)
        pad = self.tokenizer.pad_token_id
        answers: list[str] = []
        self.last_new_tokens: list[int] = []  # per answer, for throughput figures
        for start in range(0, len(instructions), batch_size):
            chunk = [
                self.prompt_ids(q, i)
                for q, i in zip(instructions[start : start + batch_size], inputs[start : start + batch_size])
            ]
            width = max(len(c) for c in chunk)
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=self.device)
            if params.seed is not None:
                torch.manual_seed(params.seed)
            with self._adapter_context(use_adapter):
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, **generate_kwargs(params, self.tokenizer, self.stops)
                )
            answers += [answer_text(self.tokenizer, row[width:], self.stops) for row in out]
            self.last_new_tokens += [self._generated_length(row[width:]) for row in out]
        return answers

    def _generated_length(self, new_ids: torch.Tensor) -> int:
        """Tokens generated for one row: up to and including the first EOS or marker token."""
        ends = torch.tensor(self.stops.eos_ids(self.tokenizer), device=new_ids.device)
        eos = torch.isin(new_ids, ends).nonzero()
        return int(eos[0, 0]) + 1 if len(eos) else int(new_ids.numel())
