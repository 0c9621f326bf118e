"""Prompt templates: one object used by training and by inference, so the two never differ.

Two kinds:
- ``alpaca``-style: Alpaca-LoRA's template file format (description, prompt_input,
  prompt_no_input, response_split). Built-ins: alpaca, alpaca_short, alpaca_legacy; a user's
  template by file path.
- ``chat``: the tokenizer's own chat template (multi-turn, system prompt).

A template renders an Example into segments (text, trained?) for training, builds the prompt
for inference, and declares where a turn ends (``stops``): generation in every path stops there
as well as at EOS. The adapter folder records the template (``lorakit_template.json``).

The template policy (``resolve_template``) is the one rule every path uses to pick a template:
generate, chat, compare, eval, serve, the UI and export. See TEMPLATE_POLICY below.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import atomic_write_text
from ..runfolder import CONFIG_RECORD, TEMPLATE_RECORD, read_config_record, run_of
from .records import Example, Turn

BUILTIN_DIR = Path(__file__).parent / "templates"
_TEMPLATE_KEYS = ("prompt_input", "prompt_no_input", "response_split")
DEFAULT_TEMPLATE = "alpaca"  # what training uses unless told otherwise (Alpaca-LoRA's default)

TEMPLATE_POLICY = """\
Which prompt template a model is prompted with (one rule for generate, chat, compare, eval,
serve, the UI and export):
  1. a template named explicitly (--template, prompt_template_name, the UI's field) always wins;
  2. an adapter, or a model merged from one, uses the template it was trained with (recorded in
     its folder as lorakit_template.json; for a checkpoint, its run's); an adapter that recorded
     none (plain peft) uses alpaca, lorakit's and Alpaca-LoRA's training default;
  3. a base model alone uses its own chat template when its tokenizer has one (what its authors
     trained it on), else alpaca;
  4. in a comparison (generate --compare, the UI's Compare tab, eval of base vs adapters) the base
     is prompted with the adapter's template, so both see the same prompt.
Generation stops at the template's turn markers (alpaca: '### Instruction:', '### Response:',
'### Input:'; a chat template: its end-of-turn token, e.g. <|im_end|>) as well as at EOS, and
never streams part of one. A template file may list its own markers under "stop"."""


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
    stop: tuple[str, ...] | None = None  # turn markers given by the template file; None = derived

    # ---- inference ---------------------------------------------------------------------------
    def build_prompt(
        self, instruction: str, input: str = "", history: list[Turn] | None = None, system: str = "", tokenizer=None
    ) -> str:
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

    def stops(self, tokenizer=None) -> Stops:
        """Where a turn ends: the strings and token ids at which generation must stop."""
        if self.kind == "chat":
            markers = list(self.stop) if self.stop is not None else _chat_end_of_turn(self, tokenizer)
        else:
            markers = list(self.stop) if self.stop is not None else self._alpaca_markers()
        return Stops.of(markers, tokenizer)

    def _alpaca_markers(self) -> list[str]:
        """The header line before each placeholder ('### Instruction:', '### Input:') and the
        response header: the text a model writes when it starts a turn that is not its own."""
        markers = []
        for tpl in (self.prompt_no_input, self.prompt_input):
            for placeholder in ("{instruction}", "{input}"):
                if placeholder in tpl:
                    before = tpl.split(placeholder, 1)[0].rstrip().splitlines()
                    if before and len(before[-1].strip()) >= 2 and "{" not in before[-1]:
                        markers.append(before[-1].strip())
        if self.response_split.strip():
            markers.append(self.response_split.strip())
        return list(dict.fromkeys(markers))

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
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.chat_template
        )

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
            # nothing before a conversation that opens with the assistant (a chat template cannot
            # render an empty one: a 500 from lorakit serve, found by schemathesis)
            prompt = self._apply_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
            full = self._apply_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
            segments.append(Segment(self._extend(done, prompt), False))
            segments.append(Segment(self._extend(prompt, full), True))
            done = full
        return segments

    def _extend(self, prefix: str, full: str) -> str:
        if not full.startswith(prefix):
            raise ConfigError(
                f"template '{self.name}': the tokenizer's chat template does not render turns "
                "incrementally, so the trained part cannot be separated; use an alpaca template"
            )
        return full[len(prefix) :]

    # ---- record ------------------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        rec = {"name": self.name, "kind": self.kind, "description": self.description}
        if self.kind == "alpaca":
            rec.update({k: getattr(self, k) for k in _TEMPLATE_KEYS})
        else:
            rec["chat_template"] = self.chat_template
        if self.stop is not None:
            rec["stop"] = list(self.stop)
        return rec

    def to_json(self) -> str:
        return json.dumps(self.to_record(), indent=2, ensure_ascii=False) + "\n"

    def save(self, folder: str | Path) -> Path:
        return atomic_write_text(Path(folder) / TEMPLATE_RECORD, self.to_json())


@dataclass(frozen=True)
class Stops:
    """Where generation stops besides EOS: text markers (cut from the answer, never streamed)
    and the token ids of markers that are one special token (skipped when decoding, so they are
    caught by id, like EOS)."""

    strings: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, markers: list[str], tokenizer=None) -> Stops:
        ids: list[int] = []
        if tokenizer is not None:
            special = set(getattr(tokenizer, "all_special_tokens", []) or [])
            special |= {
                str(t)
                for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
                if getattr(t, "special", False)
            }
            for m in markers:
                if m in special:
                    tid = tokenizer.convert_tokens_to_ids(m)
                    if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
                        ids.append(tid)
        return cls(strings=tuple(m for m in markers if m), token_ids=tuple(dict.fromkeys(ids)))

    def eos_ids(self, tokenizer) -> list[int]:
        """EOS first, then the marker tokens: what generate's ``eos_token_id`` takes."""
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return list(dict.fromkeys(eos + list(self.token_ids)))


def _chat_end_of_turn(template: PromptTemplate, tokenizer) -> list[str]:
    """A chat template's end-of-turn marker: what it writes right after an assistant message
    (``<|im_end|>`` for ChatML), else what comes between an assistant message and the next user
    turn."""
    if tokenizer is None:
        return []
    user, answer, again = "lorakit-user-3141", "lorakit-answer-2718", "lorakit-user-1618"
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    try:
        text = template._apply_chat(tokenizer, msgs, add_generation_prompt=False)
        after = text.split(answer, 1)[1].strip() if answer in text else ""
        if not after:
            text = template._apply_chat(tokenizer, msgs + [{"role": "user", "content": again}], False)
            between = text.split(answer, 1)[1].split(again, 1)[0] if answer in text and again in text else ""
            after = between.strip().splitlines()[0].strip() if between.strip() else ""
    except Exception:
        return []
    eot = after.split()[0] if after else ""  # '<|im_end|>' of '<|im_end|>' (+ a newline)
    return [eot] if eot else []


def template_from_record(rec: dict[str, Any]) -> PromptTemplate:
    kind = rec.get("kind", "alpaca")
    stop = rec.get("stop")
    stop = tuple(str(s) for s in stop if str(s)) if isinstance(stop, list) else None
    if kind == "chat":
        return PromptTemplate(
            name=rec.get("name", "chat"),
            kind="chat",
            description=rec.get("description", ""),
            chat_template=rec.get("chat_template"),
            stop=stop,
        )
    return PromptTemplate(
        name=rec.get("name", "custom"),
        kind="alpaca",
        description=rec.get("description", ""),
        stop=stop,
        **{k: rec[k] for k in _TEMPLATE_KEYS},
    )


def _json_problem(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "lists or objects nested too deeply"
    if "integer string conversion" in str(error):
        return f"a number with more than {sys.get_int_max_str_digits()} digits"
    return " ".join(str(error).split())


def _read_template_file(path: Path, name: str) -> PromptTemplate:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, a 5000-digit number
        raise ConfigError(f"prompt template {path}: cannot read it as JSON ({_json_problem(e)})") from None
    if not isinstance(rec, dict):
        raise ConfigError(f"prompt template {path}: expected a JSON object with keys {', '.join(_TEMPLATE_KEYS)}")
    stop = rec.get("stop")
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise ConfigError(f"prompt template {path}: 'stop' must be a list of non-empty strings (the turn markers)")
    for key in ("name", "description"):
        if not isinstance(rec.get(key, ""), str):
            raise ConfigError(f"prompt template {path}: '{key}' must be a string")
    if rec.get("kind") == "chat":
        if not isinstance(rec.get("chat_template", ""), (str, type(None))):
            raise ConfigError(f"prompt template {path}: 'chat_template' must be a string (a Jinja chat template)")
        return template_from_record(rec)
    for key in _TEMPLATE_KEYS:
        if not isinstance(rec.get(key), str):
            raise ConfigError(
                f"prompt template {path}: missing or non-string key '{key}' "
                f"(a template needs {', '.join(_TEMPLATE_KEYS)})"
            )
    if "{instruction}" not in rec["prompt_no_input"] or "{instruction}" not in rec["prompt_input"]:
        raise ConfigError(f"prompt template {path}: prompt_input and prompt_no_input must contain {{instruction}}")
    rec = {**rec, "name": rec.get("name", name), "kind": "alpaca"}
    return template_from_record(rec)


def load_template(name_or_path: str, tokenizer=None) -> PromptTemplate:
    """A built-in name, 'chat', or a path to an Alpaca-LoRA template JSON file."""
    if name_or_path == "chat":
        chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if tokenizer is not None and not chat_template:
            raise ConfigError(
                "prompt_template_name: 'chat' needs a tokenizer with a chat template, "
                "and this model's tokenizer has none; use alpaca"
            )
        return PromptTemplate(
            name="chat", kind="chat", description="The tokenizer's own chat template.", chat_template=chat_template
        )
    builtin = BUILTIN_DIR / f"{name_or_path}.json"
    path = Path(name_or_path)
    try:
        if "/" not in name_or_path and builtin.is_file():
            return _read_template_file(builtin, name_or_path)
        if path.is_file():
            return _read_template_file(path, path.stem)
    except OSError as e:  # a name too long for the file system, a folder that cannot be searched
        raise ConfigError(f"prompt_template_name: {name_or_path!r}: {e.strerror or e}") from None
    raise ConfigError(
        f"prompt_template_name: {name_or_path!r} is neither a built-in template "
        f"({', '.join(builtin_template_names())}) nor a template file"
    )


def template_for_folder(folder: str | Path) -> PromptTemplate | None:
    """The template recorded in an adapter or merged-model folder, if any. A record that cannot
    be used raises ConfigError naming it, rather than prompting the model another way."""
    path = Path(folder) / TEMPLATE_RECORD
    return _read_template_file(path, "custom") if path.is_file() else None


def recorded_template(folder: str | Path, tokenizer=None) -> PromptTemplate | None:
    """The template an adapter or merged folder was trained with: its record, its run's record
    (for a checkpoint), else the template named in its run's config record."""
    folder = Path(folder)
    run = run_of(folder)
    for f in (folder, run):
        recorded = template_for_folder(f)
        if recorded is not None:
            return recorded
    try:
        name = (read_config_record(run) or {}).get("prompt_template_name")
    except RecursionError:  # the one error runfolder's reader lets through
        raise ConfigError(f"{run / CONFIG_RECORD}: lists or mappings nested too deeply") from None
    if name is None:
        return None
    record = run / CONFIG_RECORD
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{record}: prompt_template_name must be a template name or file, not {name!r}")
    try:
        return load_template(name, tokenizer)
    except ConfigError as e:
        raise ConfigError(f"{record}: {e}") from None


def resolve_template(
    *, name: str | None = None, adapter: str | Path | None = None, model_path: str | Path | None = None, tokenizer=None
) -> PromptTemplate:
    """THE template policy (TEMPLATE_POLICY): every path that prompts a model calls this.

    ``name``: an explicit choice. ``adapter``: the adapter being used (also in a comparison, where
    the base shares the adapter's template). ``model_path``: the base or merged model folder.
    ``tokenizer``: the model's tokenizer (for its chat template)."""
    if name:
        return load_template(name, tokenizer)
    if adapter is not None:
        return recorded_template(adapter, tokenizer) or load_template(DEFAULT_TEMPLATE)
    if model_path is not None and Path(model_path).is_dir():
        recorded = template_for_folder(model_path)  # a merged model keeps its adapter's template
        if recorded is not None:
            return recorded
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return load_template("chat", tokenizer)
    return load_template(DEFAULT_TEMPLATE)
