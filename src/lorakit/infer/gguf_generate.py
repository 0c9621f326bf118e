"""``lorakit generate --gguf FILE`` and ``lorakit chat --gguf FILE``: a GGUF written by ``lorakit export
--to gguf`` run through llama.cpp (``llama_cpp.Llama``), prompted and stopped as lorakit does.

- The prompt: the GGUF's ``tokenizer.chat_template`` (the export put the TRAINING template there),
  rendered as llama-cpp-python renders it (gguf.py's ``_renderer``, its Jinja2ChatFormatter, with
  llama.cpp's own BOS/EOS texts), tokenized with ``add_bos=False, special=True``: the template carries
  the leading tokens, as lorakit's prompt does, so the ids are lorakit's ``prompt_ids_for``.
- The stops: EOS (and the template's marker tokens) end generation; the marker strings cut the
  answer. They come from ``export.json`` beside the file; without it, only the EOS token
  (as an id and as its text).
- Greedy by default (temperature 0 = top-k 1), sampled with ``seed`` when temperature > 0.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..data.records import Turn
from ..errors import LorakitError
from ..runfolder import EXPORT_RECORD, read_export_record
from .stops import StopFilter, cut_at_stop

INSTALL_HINT = "pip install 'lorakit[gguf]'"


@dataclass(frozen=True)
class GgufTemplate:
    """What a GGUF carries of its template: its name (from the export record), its kind (alpaca
    puts a message's ``input`` in its own key, chat folds it into the text) and its Jinja."""

    name: str
    kind: str
    jinja: str = field(repr=False)


@dataclass(frozen=True)
class GgufStops:
    token_ids: tuple[int, ...]
    strings: tuple[str, ...] = field(default=())


class GgufStreamer:
    """Prints an answer as it is generated (to ``out``, the terminal), never part of a stop string."""

    def __init__(self, stops: tuple[str, ...], out=None):
        self.stops, self.out = stops, out or sys.stdout
        self.filter = StopFilter(stops)

    def put(self, text: str, end: bool = False) -> None:
        delta = self.filter.feed(text, end)
        if delta:
            self.out.write(delta)
            self.out.flush()
        if end:  # the next answer (a chat's next turn) starts afresh
            self.out.write("\n")
            self.out.flush()
            self.filter = StopFilter(self.stops)


def _need_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise LorakitError(f"--gguf needs llama.cpp: {INSTALL_HINT}") from e
    return llama_cpp


class GgufGenerator:
    """``Generator``'s ``generate`` for a GGUF file, run by llama.cpp."""

    def __init__(self, path: str | Path, n_ctx: int = 4096, verbose: bool = False):
        llama_cpp = _need_llama_cpp()
        from ..console import info, warn
        from .gguf import _renderer, gguf_metadata, llama_threads

        self.path = Path(path)
        if not self.path.is_file():
            raise LorakitError(f"--gguf: {self.path} is not a file")
        try:
            meta = gguf_metadata(self.path)
        except Exception as e:  # not a GGUF, or a truncated one
            raise LorakitError(f"--gguf: {self.path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
        jinja = meta.get("tokenizer.chat_template")
        if not isinstance(jinja, str) or not jinja:
            raise LorakitError(f"--gguf: {self.path} has no tokenizer.chat_template (export it with lorakit export)")
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, verbose=verbose, **llama_threads())
        self.base = self.path.name  # what chat says it talks to
        eos = self.llm.token_eos()
        bos = self.llm.token_bos()
        # the BOS/EOS texts llama-cpp-python gives the chat template (Llama.__init__ does the same)
        texts = SimpleNamespace(
            eos_token=self.llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=self.llm._model.token_get_text(bos) if bos != -1 else "",
        )
        record = read_export_record(self.path.parent) or {}
        if self.path.name not in [f.get("name") for f in record.get("files") or [] if isinstance(f, dict)]:
            record = {}
        if record and not record.get("verified"):
            warn(
                f"{self.path.name}: {EXPORT_RECORD} says this export is NOT verified "
                f"({'it failed its verification' if record.get('verification') else 'exported with --no-verify'})"
            )
        stops: dict[str, Any] = record.get("stops") or {}
        if not isinstance(stops, dict):  # an Ollama folder: its stops are the Modelfile's; the GGUF step's are here
            stops = (record.get("gguf") or {}).get("stops") or {}
        if record:
            kind = record.get("template_kind") or "chat"
            self.template = GgufTemplate(str(record.get("template") or "gguf"), kind, jinja)
            ids = list(stops.get("token_ids") or []) + list(stops.get("eos_token_id") or [eos])
            strings = tuple(s for s in stops.get("strings") or [] if s)
        else:
            info(
                f"no {self.path.parent.name}/{EXPORT_RECORD} for {self.path.name}: "
                f"stopping at the EOS token ({texts.eos_token!r}) only"
            )
            kind = "alpaca" if "prompt_no_input" in jinja else "chat"  # lorakit's alpaca Jinja sets it
            self.template = GgufTemplate("gguf chat template", kind, jinja)
            ids = [eos]
            strings = (texts.eos_token,) if texts.eos_token else ()
        self.stops = GgufStops(tuple(dict.fromkeys(int(i) for i in ids if i is not None and i >= 0)), strings)
        self._render = _renderer(jinja, texts)

    def streamer(self, out=None) -> GgufStreamer:
        return GgufStreamer(self.stops.strings, out)

    def prompt_text(
        self, instruction: str, input: str = "", history: list[Turn] | None = None, system: str = ""
    ) -> str:
        from .export import Conversation, messages_for

        conv = Conversation(instruction, input, tuple(history or ()), system)
        return self._render(messages_for(self.template, conv))

    def prompt_ids(
        self, instruction: str, input: str = "", history: list[Turn] | None = None, system: str = ""
    ) -> list[int]:
        text = self.prompt_text(instruction, input, history, system)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _text(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def generate(
        self,
        instruction: str,
        input: str = "",
        history: list[Turn] | None = None,
        system: str = "",
        params=None,
        streamer: GgufStreamer | None = None,
    ) -> str:
        from .generate import GenerationParams

        params = params or GenerationParams()
        ids = self.prompt_ids(instruction, input, history, system)
        if len(ids) >= self.llm.n_ctx():
            raise LorakitError(f"the prompt ({len(ids)} tokens) does not fit the context ({self.llm.n_ctx()} tokens)")
        if params.temperature > 0:
            if params.seed is not None:
                self.llm.set_seed(params.seed)
            sampling = dict(temp=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=0.0)
        else:
            sampling = dict(temp=0.0, top_k=1, top_p=1.0, min_p=0.0)
        room = self.llm.n_ctx() - len(ids)
        new: list[int] = []
        shown = ""  # text handed to the streamer so far
        self.llm.reset()
        for tok in self.llm.generate(ids, repeat_penalty=params.repetition_penalty, reset=True, **sampling):
            if tok in self.stops.token_ids:
                break
            new.append(tok)
            text = self._text(new)
            if streamer is not None:
                final = text.rstrip("\ufffd")  # an incomplete UTF-8 character waits for its next token
                if len(final) > len(shown) and final.startswith(shown):
                    streamer.put(final[len(shown) :])
                    shown = final
            if len(new) >= min(params.max_new_tokens, room) or cut_at_stop(text, self.stops.strings)[1]:
                break
        text = self._text(new)
        if streamer is not None:
            streamer.put(text[len(shown) :] if text.startswith(shown) else "", end=True)
        return cut_at_stop(text, self.stops.strings)[0].strip()

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None and hasattr(llm, "close"):
            llm.close()
