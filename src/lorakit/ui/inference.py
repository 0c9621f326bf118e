"""One base model in memory with LoRA adapters loaded onto it by name, for the Chat, Compare
and Models tabs.

The base answers through ``disable_adapter()`` (or the plain model when no adapter is loaded),
an adapter after ``set_adapter(name)``: one copy of the weights whatever the number of adapters.
A lock serialises everything that touches the model, since the page's handlers run in threads.
Prompts are built as ``lorakit generate`` builds them: the one template policy
(``resolve_template``), the same prompt ids (``prompt_ids_for``), the same stops at the
template's turn markers (``generate_kwargs``, ``answer_text``).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.records import Turn
from ..data.templates import PromptTemplate, recorded_template, resolve_template
from ..errors import LorakitError, ModelError
from ..infer.adapters import base_model_of, check_adapter_dir, load_adapter, unload_adapter
from ..infer.generate import GenerationParams, answer_text, generate_kwargs, prompt_ids_for, recorded_base_model
from ..infer.stops import StopIteratorStreamer
from ..models.loading import load_model, load_tokenizer, resolve_model_path
from ..runfolder import ADAPTER_CONFIG, MANIFEST, read_config_record, run_of


def adapter_base(adapter: str | Path) -> str | None:
    """The base model an adapter (or a run's checkpoint) was trained on."""
    adapter = Path(adapter)
    run = run_of(adapter)
    own = (read_config_record(adapter) or {}).get("base_model") if adapter != run else None
    if own:  # a checkpoint records its run's config (the top level may hold an earlier finished run)
        return str(own)
    if (run / MANIFEST).is_file():
        return recorded_base_model(run)
    base = (read_config_record(run) or {}).get("base_model")
    if base:
        return str(base)
    return recorded_base_model(adapter)


adapter_template = recorded_template  # the template an adapter (or its run) recorded


def base_key(base: str) -> str:
    """One spelling per model: an alias or a folder, resolved to the folder's absolute path."""
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


def _weights_mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.glob("adapter_model*.safetensors")), default=0.0)


def peft_name(key: str) -> str:
    """An adapter key (NAME or NAME/checkpoint-N) as a peft adapter name (no '.' or '/')."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


class _StopWhenSet:
    """A stopping criterion: ends generation once the event is set (the page went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Speaker:
    """Who answers: the base model alone, or the base with one adapter."""

    base: str
    adapter_key: str | None = None
    adapter_folder: Path | None = None

    @property
    def label(self) -> str:
        return self.adapter_key or f"base ({Path(self.base).name})"


class ModelSession:
    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.lock = threading.RLock()
        self.base: str | None = None
        self.model_path: str | None = None
        self.model = None
        self.tokenizer = None
        self.adapters: dict[str, Path] = {}  # key -> folder, loaded onto self.model
        self._weights_mtime: dict[str, float] = {}  # key -> its weights file's mtime when loaded

    # ---- loading ----------------------------------------------------------------------------
    def use_base(self, base: str) -> bool:
        """Load ``base`` unless it is the one in memory (adapters of another base are dropped).
        Returns whether it loaded."""
        with self.lock:
            if self.model is not None and self.base is not None and base_key(self.base) == base_key(base):
                return False
            model_path = resolve_model_path(base)
            tokenizer = load_tokenizer(model_path)
            self.model = self.tokenizer = None  # free the old weights first
            self.adapters, self._weights_mtime = {}, {}
            model = load_model(model_path, dtype=self.dtype)
            model.eval()
            self.model, self.tokenizer, self.base, self.model_path = model, tokenizer, base, model_path
            return True

    def apply(self, key: str, folder: str | Path) -> None:
        """Load the adapter folder under ``key`` (again if the folder changed since)."""
        folder = check_adapter_dir(folder)
        with self.lock:
            if self.model is None:
                raise ModelError("no base model is loaded")
            mtime = _weights_mtime(folder)
            if key in self.adapters:
                if self.adapters[key] == folder and self._weights_mtime.get(key) == mtime:
                    return
                self.remove(key)  # retrained since it was applied: load the new weights
            self.model = load_adapter(self.model, folder, peft_name(key))
            self.adapters[key] = folder
            self._weights_mtime[key] = mtime

    def remove(self, key: str) -> None:
        with self.lock:
            if key not in self.adapters:
                raise LorakitError(f"adapter {key} is not applied")
            unload_adapter(self.model, peft_name(key))
            del self.adapters[key]
            self._weights_mtime.pop(key, None)

    def prepare(self, speaker: Speaker) -> None:
        """The speaker's base in memory and its adapter applied."""
        with self.lock:
            self.use_base(speaker.base)
            if speaker.adapter_key:
                self.apply(speaker.adapter_key, speaker.adapter_folder)

    # ---- generating -------------------------------------------------------------------------
    def template_for(self, speaker: Speaker | None, name: str | None = None) -> PromptTemplate:
        """The template policy (``resolve_template``) for this speaker: the one named, else the
        adapter's, else the base's own chat template (or a merged model's record)."""
        adapter = speaker.adapter_folder if speaker is not None else None
        return resolve_template(name=name, adapter=adapter, model_path=self.model_path, tokenizer=self.tokenizer)

    @contextmanager
    def _speaking(self, speaker: Speaker):
        """The model to call generate on, with the speaker's adapter active (or none)."""
        from peft import PeftModel

        model = self.model
        if speaker.adapter_key:
            model.set_adapter(peft_name(speaker.adapter_key))
            yield model
        elif isinstance(model, PeftModel) and model.peft_config:
            with model.disable_adapter():
                yield model
        else:
            yield base_model_of(model)

    def _prompt(self, template: PromptTemplate, message: str, history: list[Turn], system: str) -> torch.Tensor:
        return torch.tensor([prompt_ids_for(template, self.tokenizer, message, history=history, system=system)])

    def _generate(
        self,
        speaker: Speaker,
        template: PromptTemplate,
        message: str,
        history: list[Turn],
        system: str,
        params: GenerationParams,
        streamer=None,
        stop: threading.Event | None = None,
    ) -> str:
        from transformers import StoppingCriteriaList

        ids = self._prompt(template, message, history, system)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        criteria = StoppingCriteriaList([_StopWhenSet(stop)]) if stop is not None else None
        stops = template.stops(self.tokenizer)
        if streamer is not None:
            streamer.filter.stops = list(stops.strings)
        with torch.no_grad(), self._speaking(speaker) as model:
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                streamer=streamer,
                stopping_criteria=criteria,
                **generate_kwargs(params, self.tokenizer, stops),
            )
        return answer_text(self.tokenizer, out[0, ids.shape[1] :], stops)

    def stream(
        self,
        speaker: Speaker,
        message: str,
        history: list[Turn] | None = None,
        system: str = "",
        params: GenerationParams | None = None,
        template: str | None = None,
    ) -> Iterator[str]:
        """The answer so far, growing as tokens come (TextIteratorStreamer fed by a thread)."""
        params = params or GenerationParams()
        # the template's stop strings are set once the template is known (in _generate)
        streamer = StopIteratorStreamer(None, (), skip_prompt=True, skip_special_tokens=True)
        stop, failure = threading.Event(), []

        def work():
            try:
                with self.lock:
                    self.prepare(speaker)
                    streamer.tokenizer = self.tokenizer
                    self._generate(
                        speaker,
                        self.template_for(speaker, template),
                        message,
                        history or [],
                        system,
                        params,
                        streamer=streamer,
                        stop=stop,
                    )
            except BaseException as e:
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=work, daemon=True, name="lorakit-ui-generate")
        worker.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text
        finally:
            stop.set()  # the page closed the stream early: stop generating
        worker.join()
        if failure:
            raise failure[0]

    def answer(
        self,
        speaker: Speaker,
        message: str,
        history: list[Turn] | None = None,
        system: str = "",
        params: GenerationParams | None = None,
        template: str | PromptTemplate | None = None,
    ) -> str:
        with self.lock:
            self.prepare(speaker)
            if not isinstance(template, PromptTemplate):
                template = self.template_for(speaker, template)
            return self._generate(speaker, template, message, history or [], system, params or GenerationParams())

    def compare(
        self,
        speakers: list[Speaker],
        message: str,
        system: str = "",
        params: GenerationParams | None = None,
        template: str | None = None,
    ) -> Iterator[tuple[int, str, str]]:
        """Each speaker's answer to one prompt, as (index, answer, template name) when it is ready.
        All answer with one template (the chosen one, else the first adapter's), so the answers
        differ by the weights only."""
        bases = {base_key(s.base) for s in speakers}
        if len(bases) > 1:
            raise LorakitError(
                "compare: these adapters were trained on different base models ("
                + ", ".join(f"{s.label}: {s.base}" for s in speakers if s.adapter_key)
                + "); compare adapters of one base"
            )
        with self.lock:
            for s in speakers:
                self.prepare(s)
            first = next((s for s in speakers if s.adapter_key), None)
            chosen = self.template_for(first, template)
        for i, s in enumerate(speakers):
            yield i, self.answer(s, message, system=system, params=params, template=chosen), chosen.name

    def status(self) -> str:
        with self.lock:
            if self.model is None:
                return "no model loaded yet (the first message loads it)"
            applied = ", ".join(self.adapters) or "none"
            return f"in memory: {self.base} · adapters applied: {applied}"


def speaker_for(workdir, adapter_key: str | None, default_base: str) -> Speaker:
    """The base alone (``adapter_key`` empty) or an adapter of the workdir on its own base."""
    if not adapter_key:
        return Speaker(base=default_base)
    folder = workdir.resolve_adapter(adapter_key)
    return Speaker(base=adapter_base(folder) or default_base, adapter_key=adapter_key, adapter_folder=folder)


def manifest_text(folder: Path) -> str:
    """An adapter's manifest (or peft config) as indented JSON for the Models tab."""
    run = run_of(Path(folder))
    for path in (run / "manifest.json", Path(folder) / ADAPTER_CONFIG):
        if path.is_file():
            try:
                return json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=2, ensure_ascii=False)
            except ValueError:
                return path.read_text(encoding="utf-8", errors="replace")
    return "{}"
