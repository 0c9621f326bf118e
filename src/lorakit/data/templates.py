"""Prompt templates: one object used by training and by inference, so the two never differ.

Two kinds:
- ``alpaca``-style: Alpaca-LoRA's template file format (description, prompt_input,
  prompt_no_input, response_split). Built-ins: alpaca, alpaca_short, alpaca_legacy; a user's
  template by file path.
- ``chat``: the tokenizer's own chat template (multi-turn, system prompt).

A template renders an Example into segments (text, trained?) for training, and builds the
prompt for inference. The adapter folder records the template (``lorakit_template.json``) so
``generate`` uses the same one by default.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import atomic_write_text
from ..runfolder import TEMPLATE_RECORD, read_template_record
from .records import Example, Turn

BUILTIN_DIR = Path(__file__).parent / "templates"
_TEMPLATE_KEYS = ("prompt_input", "prompt_no_input", "response_split")


def builtin_template_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json")) + ["chat"]


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool  # counts in the loss (assistant turns, plain text)


@dataclass
class PromptTemplate:
    name: str
    kind: str  # "alpaca" | "chat"
    description: str = ""
    prompt_input: str = ""
    prompt_no_input: str = ""
    response_split: str = ""
    chat_template: str | None = None  # kind "chat": the tokenizer's Jinja template

    # ---- inference ---------------------------------------------------------------------------
    def build_prompt(self, instruction: str, input: str = "", history: list[Turn] | None = None,
                     system: str = "", tokenizer=None) -> str:
        """The text the model sees before it answers ``instruction``."""
        turns = list(history or []) + [Turn("user", instruction)]
        example = Example(turns=turns, input=input if not history else "", system=system)
        segments = self.render(example, tokenizer, for_generation=True)
        return "".join(s.text for s in segments)

    def extract_response(self, text: str) -> str:
        """The answer part of a decoded prompt+answer (Alpaca-LoRA's response_split)."""
        if self.kind == "alpaca" and self.response_split and self.response_split in text:
            return text.split(self.response_split)[-1].strip()
        return text.strip()

    # ---- training ----------------------------------------------------------------------------
    def render(self, example: Example, tokenizer=None, for_generation: bool = False) -> list[Segment]:
        """Example -> segments. With for_generation the example ends on a user turn and the
        result ends with the prompt the model answers."""
        if example.text is not None:
            return [Segment(example.text, True)]
        if self.kind == "chat":
            return self._render_chat(example, tokenizer, for_generation)
        return self._render_alpaca(example)

    def _render_alpaca(self, example: Example) -> list[Segment]:
        segments: list[Segment] = []
        if example.system:
            segments.append(Segment(example.system + "\n\n", False))
        first_user = True
        for turn in example.turns:
            if turn.role == "user":
                inp = example.input if first_user else ""
                first_user = False
                # str.replace rather than str.format: braces in user text or templates are safe
                tpl = self.prompt_input if inp else self.prompt_no_input
                text = tpl.replace("{instruction}", turn.content).replace("{input}", inp)
                segments.append(Segment(text, False))
            else:
                segments.append(Segment(turn.content, True))
        return segments

    def _chat_messages(self, example: Example) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": example.system}] if example.system else []
        for i, turn in enumerate(example.turns):
            content = turn.content
            if i == 0 and example.input:
                content = f"{content}\n\n{example.input}"
            messages.append({"role": turn.role, "content": content})
        return messages

    def _apply_chat(self, tokenizer, messages, add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             chat_template=self.chat_template)

    def _render_chat(self, example: Example, tokenizer, for_generation: bool) -> list[Segment]:
        if tokenizer is None:
            raise ValueError("the chat template needs the tokenizer")
        messages = self._chat_messages(example)
        segments: list[Segment] = []
        done = ""  # text rendered so far; each new piece must extend it
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                if i + 1 < len(messages):
                    continue
                # last message is a user turn: the generation prompt follows
                full = self._apply_chat(tokenizer, messages, add_generation_prompt=True)
                segments.append(Segment(self._extend(done, full), False))
                return segments
            prompt = self._apply_chat(tokenizer, messages[:i], add_generation_prompt=True)
            full = self._apply_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
            segments.append(Segment(self._extend(done, prompt), False))
            segments.append(Segment(self._extend(prompt, full), True))
            done = full
        return segments

    def _extend(self, prefix: str, full: str) -> str:
        if not full.startswith(prefix):
            raise ConfigError(
                f"template '{self.name}': the tokenizer's chat template does not render turns "
                "incrementally, so the trained part cannot be separated; use an alpaca template")
        return full[len(prefix):]

    # ---- record ------------------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        rec = {"name": self.name, "kind": self.kind, "description": self.description}
        if self.kind == "alpaca":
            rec.update({k: getattr(self, k) for k in _TEMPLATE_KEYS})
        else:
            rec["chat_template"] = self.chat_template
        return rec

    def to_json(self) -> str:
        return json.dumps(self.to_record(), indent=2, ensure_ascii=False) + "\n"

    def save(self, folder: str | Path) -> Path:
        return atomic_write_text(Path(folder) / TEMPLATE_RECORD, self.to_json())


def template_from_record(rec: dict[str, Any]) -> PromptTemplate:
    kind = rec.get("kind", "alpaca")
    if kind == "chat":
        return PromptTemplate(name=rec.get("name", "chat"), kind="chat",
                              description=rec.get("description", ""), chat_template=rec.get("chat_template"))
    return PromptTemplate(name=rec.get("name", "custom"), kind="alpaca",
                          description=rec.get("description", ""),
                          **{k: rec[k] for k in _TEMPLATE_KEYS})


def _read_template_file(path: Path, name: str) -> PromptTemplate:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"prompt template {path}: cannot read it as JSON ({e})") from None
    if not isinstance(rec, dict):
        raise ConfigError(f"prompt template {path}: expected a JSON object with keys {', '.join(_TEMPLATE_KEYS)}")
    if rec.get("kind") == "chat":
        return template_from_record(rec)
    for key in _TEMPLATE_KEYS:
        if not isinstance(rec.get(key), str):
            raise ConfigError(f"prompt template {path}: missing or non-string key '{key}' "
                              f"(a template needs {', '.join(_TEMPLATE_KEYS)})")
    if "{instruction}" not in rec["prompt_no_input"] or "{instruction}" not in rec["prompt_input"]:
        raise ConfigError(f"prompt template {path}: prompt_input and prompt_no_input must contain {{instruction}}")
    rec = {**rec, "name": rec.get("name", name), "kind": "alpaca"}
    return template_from_record(rec)


def load_template(name_or_path: str, tokenizer=None) -> PromptTemplate:
    """A built-in name, 'chat', or a path to an Alpaca-LoRA template JSON file."""
    if name_or_path == "chat":
        chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if tokenizer is not None and not chat_template:
            raise ConfigError("prompt_template_name: 'chat' needs a tokenizer with a chat template, "
                              "and this model's tokenizer has none; use alpaca")
        return PromptTemplate(name="chat", kind="chat",
                              description="The tokenizer's own chat template.", chat_template=chat_template)
    builtin = BUILTIN_DIR / f"{name_or_path}.json"
    if "/" not in name_or_path and builtin.is_file():
        return _read_template_file(builtin, name_or_path)
    path = Path(name_or_path)
    if path.is_file():
        return _read_template_file(path, path.stem)
    raise ConfigError(f"prompt_template_name: '{name_or_path}' is neither a built-in template "
                      f"({', '.join(builtin_template_names())}) nor a template file")


def template_for_folder(folder: str | Path) -> PromptTemplate | None:
    """The template recorded in an adapter or merged-model folder, if any."""
    record = read_template_record(folder)
    return template_from_record(record) if record is not None else None
