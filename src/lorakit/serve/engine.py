"""The serving engine: one base model, many LoRA adapters, and continuous batching.

Requests from any number of clients go into one queue. A single worker thread runs the model
one decoding step at a time over all the requests in progress (up to ``max_batch_size``): a new
request joins at the next step (its prompt is prefilled, and its key/value cache is left-padded
into the batch's), and a finished or abandoned one leaves at once, so a long answer never holds
up a short one and a client that disconnects frees its row for the next request. peft's per-row
adapter selection (``adapter_names``) lets requests for different adapters and for the base share
a step. Each row has its own sampling parameters, seed, max_tokens and stop strings; greedy rows
take the argmax of their own logits, so their answers do not depend on their neighbours.

Adapters are loaded and unloaded by the worker between steps, so no step ever sees the model
change under it; an adapter being unloaded takes no new requests and is freed when its last
request ends.
"""

from __future__ import annotations

import inspect
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel

from ..data.records import Turn
from ..data.templates import PromptTemplate, Stops, resolve_template
from ..data.tokenize import encode_prompt
from ..errors import LorakitError
from ..infer.adapters import base_model_of, check_adapter_dir, load_adapter, unload_adapter
from ..infer.generate import prompt_ids_for
from ..infer.stops import cut_at_stop, held_back
from ..models.loading import load_model, load_tokenizer, resolve_model_path

log = logging.getLogger("lorakit.serve")

BASE_ROW = "__base__"  # peft's name for "no adapter" in adapter_names


class EngineError(LorakitError):
    """A request the engine refuses; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass
class Request:
    """One generation: its prompt, its model, its limits, and what it has produced so far."""

    prompt_ids: list[int]
    model: str  # the base's name or an adapter's name
    adapter: str | None  # None = the base
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # the client's, plus the template's turn markers
    stop_ids: frozenset[int] = frozenset()  # the template's marker tokens (set by submit)
    on_event: Callable[[str, object], None] | None = None  # ("delta", text) / ("done", finish_reason)
    # state, written by the worker
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the answer so far, cut at a stop string
    sent: int = 0  # characters of text already handed out as deltas
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None  # a sampled request's own random stream

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """The client went away: the worker stops generating for it at its next step."""
        self.cancelled = True


@dataclass
class AdapterInfo:
    name: str
    path: Path
    template: PromptTemplate
    stops: Stops = field(default_factory=Stops)
    loaded_at: float = field(default_factory=time.time)
    in_flight: int = 0
    unloading: bool = False


_GREEDY_BELOW = 1e-5  # a temperature under this is greedy, as in vLLM


def _pick_tokens(logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
    """One next token per row: argmax for greedy rows; temperature / top-p sampling with the
    request's own seeded generator for the others."""
    tokens = logits.argmax(-1)
    for i, r in enumerate(rows):
        if r.temperature < _GREEDY_BELOW:  # 5e-324 is 0.0 in float32: logits / 0 would be inf
            continue
        if r.generator is None:
            r.generator = torch.Generator(device=logits.device)
            r.generator.manual_seed(r.seed if r.seed is not None else secrets.randbits(63))
        probs = torch.softmax(logits[i].float() / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < r.top_p
            keep[0] = True  # the top token, always (a top_p of 5e-324 is 0.0 in float32; found by schemathesis)
            probs = torch.zeros_like(probs).scatter(0, order, torch.where(keep, sorted_probs, 0.0))
        tokens[i] = torch.multinomial(probs, 1, generator=r.generator)[0]
    return tokens


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _Batch:
    """The rows in progress: their requests, KV cache, attention mask, last token and position."""

    def __init__(self, rows, cache, mask, last, pos):
        self.rows, self.cache, self.mask, self.last, self.pos = rows, cache, mask, last, pos

    def merge(self, other: _Batch) -> None:
        from transformers import DynamicCache

        width = max(self.mask.shape[1], other.mask.shape[1])
        layers = []
        for a, b in zip(self.cache.layers, other.cache.layers):
            layers.append(
                (
                    torch.cat([_pad_left(a.keys, width, 2), _pad_left(b.keys, width, 2)]),
                    torch.cat([_pad_left(a.values, width, 2), _pad_left(b.values, width, 2)]),
                )
            )
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        self.last = torch.cat([self.last, other.last])
        self.pos = torch.cat([self.pos, other.pos])
        self.rows = self.rows + other.rows

    def keep(self, keep: list[int]) -> None:
        """Drop the other rows, and the columns no remaining row uses."""
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.last, self.pos = self.mask[index], self.last[index], self.pos[index]
            self.rows = [self.rows[i] for i in keep]
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]


class Engine:
    def __init__(
        self,
        base: str,
        *,
        base_name: str | None = None,
        template: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        max_batch_size: int = 8,
        max_queue: int = 64,
        batch_wait_ms: float = 10.0,
        max_prompt_tokens: int | None = None,
        max_tokens_limit: int = 1024,
        trust_remote_code: bool = False,
        metrics=None,
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise LorakitError("serve: --max-batch-size and --max-queue must be at least 1")
        self.base = base
        self.base_name = base_name or base
        model_path = resolve_model_path(base)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {
            "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }.get(dtype)
        if torch_dtype is None:
            raise LorakitError(f"serve: --dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
        self.model = load_model(model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code).to(device)
        self.model.eval()
        # transformers renamed forward's past_key_values to cache (5.2x); take whichever this one has
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.device = torch.device(device)
        # the template policy: the base alone is prompted with its own chat template (or the one named)
        self.base_template = resolve_template(name=template, model_path=model_path, tokenizer=self.tokenizer)
        self.base_stops = self.base_template.stops(self.tokenizer)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids = set(eos) | ({self.tokenizer.eos_token_id} - {None})
        context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.context_len = int(context)
        self.max_prompt_tokens = min(max_prompt_tokens or self.context_len - 1, self.context_len - 1)
        self.max_tokens_limit = max_tokens_limit
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.batch_wait = batch_wait_ms / 1000
        self.metrics = metrics
        self.adapters: dict[str, AdapterInfo] = {}
        self._lock = threading.Lock()  # guards adapters' counters and the admission count
        self._admitted = 0  # requests accepted and not yet finished
        self._queue: queue.Queue = queue.Queue()
        self._controls: queue.Queue = queue.Queue()
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name="lorakit-batcher", daemon=True)
        self._worker.start()

    # ---- models ----------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        with self._lock:
            return [self.base_name] + [a.name for a in self.adapters.values() if not a.unloading]

    def template_for(self, model: str) -> PromptTemplate:
        if model == self.base_name:
            return self.base_template
        return self.adapters[model].template

    def stops_for(self, model: str) -> Stops:
        if model == self.base_name:
            return self.base_stops
        return self.adapters[model].stops

    def load_adapter(self, name: str, path: Path) -> AdapterInfo:
        """Load an adapter folder under ``name`` (between batches; blocks until done)."""
        folder = check_adapter_dir(path)
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        if config.get("use_dora"):
            raise EngineError(
                f"adapter {folder.name}: DoRA adapters cannot share a batch with other rows (peft "
                "limitation); serve it merged instead: lorakit merge, then lorakit serve --base MERGED",
                400,
                "unsupported_adapter",
                "path",
            )
        if config.get("peft_type", "LORA") != "LORA":
            raise EngineError(
                f"adapter {folder.name}: only LoRA adapters can be served, not {config.get('peft_type')}",
                400,
                "unsupported_adapter",
                "path",
            )
        with self._lock:
            if name == self.base_name or name in self.adapters:
                raise EngineError(f"a model named '{name}' is already loaded", 409, "model_exists", "name")
        return self._control(lambda: self._do_load(name, folder))

    def _do_load(self, name: str, folder: Path) -> AdapterInfo:
        self.model = load_adapter(self.model, folder, name)
        self.model.eval()
        template = resolve_template(adapter=folder, tokenizer=self.tokenizer)  # the one it was trained with
        info = AdapterInfo(name=name, path=folder, template=template, stops=template.stops(self.tokenizer))
        with self._lock:
            self.adapters[name] = info
        self._update_adapter_gauge()
        return info

    def unload_adapter(self, name: str, timeout: float = 600.0) -> None:
        """Stop taking requests for ``name``; free it once its requests in flight are done."""
        with self._lock:
            info = self.adapters.get(name)
            if info is None or info.unloading:
                raise EngineError(f"no adapter named '{name}' is loaded", 404, "model_not_found", "name")
            info.unloading = True
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if info.in_flight == 0:
                    break
            if time.monotonic() > deadline:
                with self._lock:
                    info.unloading = False
                raise EngineError(f"adapter '{name}' still has requests in flight", 409, "adapter_busy")
            time.sleep(0.02)
        self._control(lambda: self._do_unload(name))

    def _do_unload(self, name: str) -> None:
        unload_adapter(self.model, name)
        with self._lock:
            del self.adapters[name]
        self._update_adapter_gauge()

    def _update_adapter_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.adapters_loaded.set(len(self.adapters))

    def _control(self, fn):
        """Run ``fn`` on the worker thread between batches and return its result."""
        fut: Future = Future()
        self._controls.put((fn, fut))
        self._queue.put(None)  # wakes an idle worker
        return fut.result()

    # ---- prompts ---------------------------------------------------------------------------
    def chat_prompt_ids(self, model: str, messages: list[tuple[str, str]]) -> list[int]:
        """(role, content) messages -> prompt ids, by the model's own template."""
        system = "\n\n".join(c for role, c in messages if role == "system")
        turns = [Turn(role, c) for role, c in messages if role != "system"]
        if not turns or turns[-1].role != "user":
            raise EngineError("messages: the last message must be from the user", 400, param="messages")
        for i, t in enumerate(turns):
            if t.role not in ("user", "assistant"):
                raise EngineError(f"messages[{i}]: unknown role '{t.role}'", 400, param="messages")
        return prompt_ids_for(
            self.template_for(model), self.tokenizer, turns[-1].content, history=turns[:-1], system=system
        )

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    # ---- admission -------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request (validated here: model, lengths, load) and return it."""
        n = len(request.prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty", 400, param="prompt")
        if n > self.max_prompt_tokens:
            raise EngineError(
                f"the prompt is {n} tokens; this server takes at most {self.max_prompt_tokens}",
                400,
                "context_length_exceeded",
                "messages",
            )
        request.max_tokens = max(1, min(request.max_tokens, self.context_len - n))
        with self._lock:
            if request.model != self.base_name:
                info = self.adapters.get(request.model)
                if info is None or info.unloading:
                    raise EngineError(f"The model '{request.model}' does not exist", 404, "model_not_found", "model")
                request.adapter = request.model
                stops = info.stops
            else:
                request.adapter = None
                stops = self.base_stops
            # every answer ends at its template's turn markers, as in generate and the UI
            request.stop = list(dict.fromkeys(list(request.stop) + list(stops.strings)))
            request.stop_ids = frozenset(stops.token_ids)
            if self._admitted >= self.max_queue:
                raise EngineError(
                    f"the server is at capacity ({self.max_queue} requests in progress); retry shortly",
                    503,
                    "overloaded",
                )
            self._admitted += 1
            if request.adapter is not None:
                self.adapters[request.adapter].in_flight += 1
        if self.metrics is not None:
            self.metrics.in_flight.set(self._admitted)
        self._queue.put(request)
        return request

    def _release(self, request: Request) -> None:
        with self._lock:
            self._admitted -= 1
            if request.adapter is not None and request.adapter in self.adapters:
                self.adapters[request.adapter].in_flight -= 1
        if self.metrics is not None:
            self.metrics.in_flight.set(self._admitted)

    @property
    def in_progress(self) -> int:
        return self._admitted

    # ---- the worker ------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._stopping = True
        self._queue.put(None)
        self._worker.join(timeout=30)

    def _run(self) -> None:
        batch: _Batch | None = None
        while not self._stopping:
            new: list[Request] = []
            if batch is None:  # idle: wait for work, then briefly for company
                item = self._queue.get()
                self._run_controls()
                if item is None:
                    continue
                new.append(item)
                deadline = time.perf_counter() + self.batch_wait
            else:
                self._run_controls()
                deadline = 0.0
            room = self.max_batch_size - (len(batch.rows) if batch else 0)
            while len(new) < room:
                try:
                    wait = deadline - time.perf_counter()
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    new.append(item)
            live = []
            for r in new:
                if r.cancelled:
                    self._finish(r, "cancelled")
                else:
                    live.append(r)
            try:
                if live:
                    joined = self._prefill(live)
                    if batch is None:
                        batch = joined
                    else:
                        batch.merge(joined)
                    batch = self._prune(batch)
                if batch is not None:
                    self._decode(batch)
                    batch = self._prune(batch)
            except Exception as e:  # a broken step fails its requests, never the worker
                log.exception("generation failed")
                for r in (batch.rows if batch else []) + live:
                    if not r.finished:
                        r.error = f"generation failed: {type(e).__name__}"
                        self._finish(r, "error")
                batch = None

    def _run_controls(self) -> None:
        while True:
            try:
                fn, fut = self._controls.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)

    @staticmethod
    def _out_cache(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def _forward(self, rows: list[Request], **kwargs):
        """The model on these rows, each with its own adapter (or none)."""
        if isinstance(self.model, PeftModel):
            if self.model.peft_config:
                return self.model(adapter_names=[r.adapter or BASE_ROW for r in rows], **kwargs)
            return base_model_of(self.model)(**kwargs)  # every adapter unloaded: LoRA layers pass through
        return self.model(**kwargs)

    @torch.no_grad()
    def _prefill(self, rows: list[Request]) -> _Batch:
        """Run the new rows' prompts (left-padded together); each gets its first token."""
        pad = self.tokenizer.pad_token_id
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=self.device
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(
            rows, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        tokens = _pick_tokens(out.logits[:, -1, :].float(), rows)
        batch = _Batch(rows, self._out_cache(out), mask, tokens, mask.sum(-1))
        self._take(batch, tokens)
        return batch

    @torch.no_grad()
    def _decode(self, batch: _Batch) -> None:
        """One step for every row."""
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        length = batch.cache.get_seq_length()
        out = self._forward(
            batch.rows,
            input_ids=batch.last[:, None],
            attention_mask=mask,
            position_ids=batch.pos[:, None],
            cache_position=torch.tensor([length], device=self.device),
            use_cache=True,
            **{self._cache_arg: batch.cache},
        )
        batch.cache, batch.mask, batch.pos = self._out_cache(out), mask, batch.pos + 1
        batch.last = _pick_tokens(out.logits[:, -1, :].float(), batch.rows)
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch.rows))
        self._take(batch, batch.last)

    def _take(self, batch: _Batch, tokens: torch.Tensor) -> None:
        now = time.perf_counter()
        for r, token in zip(batch.rows, tokens.tolist()):
            if r.finished:
                continue
            if r.first_token_at is None:
                r.first_token_at = now
            if token in self.eos_ids or token in r.stop_ids:
                self._finish(r, "stop")
                continue
            r.ids.append(token)
            self._advance_text(r)
            if not r.finished and len(r.ids) >= r.max_tokens:
                self._finish(r, "length")

    def _prune(self, batch: _Batch) -> _Batch | None:
        for r in batch.rows:
            if r.cancelled and not r.finished:
                self._finish(r, "cancelled")
        keep = [i for i, r in enumerate(batch.rows) if not r.finished]
        if not keep:
            return None
        batch.keep(keep)
        return batch

    # ---- per-row text ----------------------------------------------------------------------
    def _cut(self, r: Request, text: str) -> tuple[str, bool]:
        """The text up to the first stop string, and whether one was found."""
        return cut_at_stop(text, r.stop)

    def _advance_text(self, r: Request) -> None:
        text = self.tokenizer.decode(r.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next token
            return
        r.text, stopped = self._cut(r, text)
        if stopped:
            self._finish(r, "stop")
            return
        # never hand out the start of what may become a stop string
        self._emit(r, len(text) - held_back(text, r.stop))

    def _emit(self, r: Request, upto: int) -> None:
        if upto > r.sent and r.on_event is not None:
            r.on_event("delta", r.text[r.sent : upto])
        r.sent = max(r.sent, upto)

    def _finish(self, r: Request, reason: str) -> None:
        if r.finished:
            return
        if reason in ("stop", "length"):
            r.text, _ = self._cut(r, self.tokenizer.decode(r.ids, skip_special_tokens=True))
            self._emit(r, len(r.text))
        r.finish_reason = reason
        if self.metrics is not None:
            self.metrics.record_finish(r)
        self._release(r)
        r.done.set()
        if r.on_event is not None:
            r.on_event("done", reason)

    # ---- convenience for tests and scripts -------------------------------------------------
    def generate_text(
        self, prompt_ids: list[int], model: str | None = None, max_tokens: int = 64, **sampling
    ) -> Request:
        """Submit one request and wait for it."""
        r = self.submit(
            Request(
                prompt_ids=prompt_ids, model=model or self.base_name, adapter=None, max_tokens=max_tokens, **sampling
            )
        )
        r.done.wait()
        return r
