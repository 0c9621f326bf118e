"""``lorakit export --to ollama``: a folder ``ollama create NAME -f Modelfile`` turns into a model
that prompts exactly as lorakit's training did.

    out/
      model.gguf (merged)            the adapter merged into its base (gguf.export_gguf)
      or base.gguf + adapter.gguf    with --lora-only: the base and a GGUF LoRA (gguf.export_gguf_lora)
      Modelfile                      FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER lines
      README.md                      the two ollama commands
      export.json                    this export's record (with the GGUF step's record and figures)

The Modelfile's TEMPLATE is the adapter's training template (the template policy's answer)
written in Ollama's Go template syntax over ``.Messages`` (system message, multi-turn):

- an alpaca-kind template: an optional leading system message + a blank line, each user message
  through ``prompt_no_input`` and each assistant message as its bare text (as build_prompt). Ollama
  messages carry no Alpaca ``input`` field: put it in the message text. Template texts are written
  as Go string literals, so braces, quotes and newlines of a template file are safe;
- a ``chat`` template: only ChatML (``<|im_start|>role\\n...<|im_end|>\\n``, what SmolLM2 uses) is
  translated, detected by rendering the recorded Jinja with the tokenizer. A default system prompt
  the Jinja adds when there is none becomes the Modelfile's SYSTEM (Ollama then puts it first, as
  the Jinja did). Other chat templates are refused: ``--to gguf`` keeps the tokenizer's chat template
  in the GGUF for llama.cpp's own chat handling.

``PARAMETER stop`` lines: every turn marker of the template and the EOS token text. Sampling:
``temperature 0`` (lorakit's greedy default, GenerationParams.temperature), ``top_k``/``top_p`` as
GenerationParams, ``repeat_penalty 1`` (lorakit applies none).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data.templates import PromptTemplate
from ..errors import LorakitError
from ..files import atomic_write_text, staged_folder
from ..runfolder import EXPORT_RECORD
from .generate import GenerationParams

MODELFILE = "Modelfile"
README = "README.md"
_WORK = ".gguf-step"  # the GGUF step writes here, inside the staging folder; its .gguf files move up


class OllamaExportError(LorakitError):
    """A template Ollama's Modelfile cannot express, or a GGUF step without its file."""


# ---- the TEMPLATE ------------------------------------------------------------------------------


def go_literal(text: str) -> str:
    """A Go interpreted string literal for any text (JSON's escapes are Go's); '"' is escaped, so
    the Modelfile's triple quotes never appear in one."""
    return json.dumps(text, ensure_ascii=False)


def _text(text: str) -> str:
    """An action that writes ``text`` as it is (nothing for an empty text)."""
    return "{{ " + go_literal(text) + " }}" if text else ""


def alpaca_go_template(template: PromptTemplate) -> str:
    """build_prompt's text for an alpaca-kind template, over Ollama's .Messages."""
    parts = template.prompt_no_input.replace("{input}", "").split("{instruction}")
    user = "{{ .Content }}".join(_text(p) for p in parts)
    return (
        "{{- range .Messages }}\n"
        '{{- if eq .Role "system" }}{{ if .Content }}{{ .Content }}{{ "\\n\\n" }}{{ end }}\n'
        '{{- else if eq .Role "user" }}' + user + "\n"
        "{{- else }}{{ .Content }}\n"
        "{{- end }}\n"
        "{{- end }}"
    )


CHATML_GO_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n'
    "{{ end }}\n"
    "{{- end }}"
)


def _chatml(messages: list[dict[str, str]], generation: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation else "")


def chatml_default_system(template: PromptTemplate, tokenizer) -> str | None:
    """None when the chat template is plain ChatML; the default system prompt it adds when it is
    ChatML with one; raises when it is not ChatML."""
    sys_, u1, a1, u2 = "lorakit-system-1", "lorakit-user-2", "lorakit-answer-3", "lorakit-user-4"
    full = [
        {"role": "system", "content": sys_},
        {"role": "user", "content": u1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": u2},
    ]
    try:
        with_system = template._apply_chat(tokenizer, full, add_generation_prompt=True)
        alone = template._apply_chat(tokenizer, full[1:2], add_generation_prompt=True)
    except Exception as e:
        raise OllamaExportError(f"--to ollama: the chat template does not render ({type(e).__name__}: {e})") from None
    plain = _chatml(full[1:2], True)
    head = "<|im_start|>system\n"
    if with_system == _chatml(full, True):
        if alone == plain:
            return None
        if alone.startswith(head) and alone.endswith("<|im_end|>\n" + plain):
            default = alone[len(head) : -len("<|im_end|>\n" + plain)]
            if "<|im_" not in default:
                return default
    raise OllamaExportError(
        f"--to ollama: template '{template.name}' is a chat template lorakit cannot translate to Ollama's "
        "Modelfile (only ChatML <|im_start|>role ... <|im_end|> is); use --to gguf, whose file keeps the "
        "tokenizer's chat template for llama.cpp's own chat template handling"
    )


def go_template(template: PromptTemplate, tokenizer=None) -> tuple[str, str | None]:
    """(TEMPLATE text, default SYSTEM or None) for the lorakit template."""
    if template.kind == "chat":
        if tokenizer is None:
            raise OllamaExportError("--to ollama: a chat template needs the tokenizer to be translated")
        return CHATML_GO_TEMPLATE, chatml_default_system(template, tokenizer)
    return alpaca_go_template(template), None


# ---- the Modelfile -----------------------------------------------------------------------------


def stop_strings(template: PromptTemplate, tokenizer=None) -> list[str]:
    """Every turn marker of the template and the EOS token text."""
    stops = list(template.stops(tokenizer).strings)
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if isinstance(eos, str) and eos:
        stops.append(eos)
    return list(dict.fromkeys(s for s in stops if s))


def sampling_parameters(params: GenerationParams | None = None) -> dict[str, Any]:
    """Ollama parameters for lorakit's defaults: greedy (temperature 0)."""
    p = params or GenerationParams()
    return {
        "temperature": p.temperature,
        "top_k": p.top_k,
        "top_p": p.top_p,
        "repeat_penalty": p.repetition_penalty,
        "num_predict": p.max_new_tokens,
    }


def _quoted(text: str) -> str:
    if '"""' in text:
        raise OllamaExportError('--to ollama: a text for the Modelfile contains """, which it cannot quote')
    return '"""' + text + '"""'


def modelfile_text(
    from_file: str,
    template_text: str,
    stops: list[str],
    adapter_file: str | None = None,
    system: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> str:
    lines = ["# Written by lorakit export --to ollama: ollama create NAME -f Modelfile", f"FROM ./{from_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    lines.append(f"TEMPLATE {_quoted(template_text)}")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    for s in stops:
        lines.append(f"PARAMETER stop {go_literal(s)}")
    for key, value in (parameters if parameters is not None else sampling_parameters()).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def readme_text(name: str, record: dict) -> str:
    files = ", ".join(f"`{f}`" for f in record["gguf_files"])
    return (
        f"# {name} for Ollama\n\n"
        f"Exported by `lorakit export --to ollama` from `{record['adapter']}` (base `{record['base_model']}`, "
        f"template `{record['template']}`). Files: {files}, `Modelfile`.\n\n"
        "```\n"
        f"ollama create {name} -f Modelfile\n"
        f"ollama run {name}\n"
        "```\n\n"
        "Run the commands in this folder (the Modelfile names its GGUF files relative to it). "
        "Sampling defaults are lorakit's: greedy (temperature 0); change them with `/set parameter` or "
        "the API's options.\n"
    )


# ---- export ------------------------------------------------------------------------------------


def _default_gguf_step(lora_only: bool) -> Callable[..., dict]:
    from . import gguf

    return gguf.export_gguf_lora if lora_only else gguf.export_gguf


def _load_tokenizer(base: str, trust_remote_code: bool):
    from ..models.loading import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(base), trust_remote_code=trust_remote_code)


def export_ollama(
    adapter: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    quant: str = "q8_0",
    lora_only: bool = False,
    force: bool = False,
    verify: bool = True,
    vset=None,
    new_tokens: int | None = None,
    min_top1: float | None = None,
    llama_cpp_dir: str | Path | None = None,
    name: str | None = None,
    trust_remote_code: bool = False,
    gguf_step: Callable[..., dict] | None = None,
    tokenizer=None,
    qlora: dict | None = None,
) -> dict:
    """Write the Ollama folder for ``adapter`` at ``out``; returns the export record. ``gguf_step``
    (tests) replaces gguf.export_gguf (or export_gguf_lora with ``lora_only``). A GGUF that fails its
    verification is kept, marked unverified (its file name, UNVERIFIED.txt, the Modelfile's first
    lines), and VerificationFailed is raised once the folder is in place."""
    from ..data.templates import resolve_template
    from ..models.registry import DEFAULT_BASE_MODEL
    from ..runfolder import recorded_base_model
    from .export import check_portability, finish_record, placed
    from .merge import check_merge_args
    from .verify import VerificationFailed

    target = "ollama"
    adapter_dir, out = check_merge_args(adapter, out, "fp32", force)
    check_portability(adapter_dir, target, base, lora_only=lora_only)
    base_name = base or recorded_base_model(adapter_dir) or DEFAULT_BASE_MODEL
    if tokenizer is None:
        tokenizer = _load_tokenizer(base_name, trust_remote_code)
    template = resolve_template(adapter=adapter_dir, tokenizer=tokenizer)
    template_text, system = go_template(template, tokenizer)  # refuses a template it cannot translate, first
    stops = stop_strings(template, tokenizer)
    name = name or adapter_dir.resolve().name
    step = gguf_step or _default_gguf_step(lora_only)
    record: dict[str, Any] = {
        "format": "ollama",
        "lora_only": lora_only,
        "quant": None if lora_only else quant,
        "template": template.name,
        "template_kind": template.kind,
        "stops": stops,
        "system": system,
        "parameters": sampling_parameters(),
        "adapter": str(adapter_dir.resolve()),
        "base_model": base_name,
    }
    checks: dict[str, Any] = {"base": base, "verify": verify, "llama_cpp_dir": llama_cpp_dir}
    if qlora:
        checks["qlora"] = qlora
    if verify:
        checks.update(vset=vset, min_top1=min_top1, trust_remote_code=trust_remote_code)
        if new_tokens:
            checks["new_tokens"] = new_tokens
    failure = None
    with staged_folder(out, "exporting") as staging:
        work = staging / _WORK
        try:
            if lora_only:
                gguf_record = step(adapter_dir, work, **checks)
            else:
                gguf_record = step(adapter_dir, work, quant=quant, **checks)
        except VerificationFailed as e:
            if e.record is None:  # failed before a file was kept
                raise
            failure, gguf_record = e, e.record
        keys = ("base_gguf_file", "lora_file") if lora_only else ("gguf_file",)
        moved = []
        for key in keys:
            path = work / Path(str(gguf_record.get(key) or "")).name
            if not gguf_record.get(key) or not path.is_file():
                raise OllamaExportError(f"--to ollama: the GGUF step wrote no {key} ({path})")
            shutil.move(str(path), str(staging / path.name))
            moved.append(staging / path.name)
        shutil.rmtree(work, ignore_errors=True)
        record["gguf"] = {
            k: v for k, v in gguf_record.items() if k not in (*keys, "files", "verification", "out", "versions")
        }
        record["gguf_files"] = [p.name for p in moved]
        record["verification"] = gguf_record.get("verification")
        text = modelfile_text(
            moved[0].name, template_text, stops, adapter_file=moved[1].name if lora_only else None, system=system
        )
        if failure is not None:
            text = f"# UNVERIFIED: this export failed its verification (see {EXPORT_RECORD}); do not deploy it\n{text}"
        atomic_write_text(staging / MODELFILE, text)
        atomic_write_text(staging / README, readme_text(name, record))
        finish_record(staging, record, verify, failure, moved)
    return {**placed(record, out, failure), "modelfile": str(out / MODELFILE), "name": name}


def summary(record: dict) -> str:
    from .export import summary as export_summary

    return (
        export_summary(record)
        + f"\nthen: cd {record['out']} && ollama create {record['name']} -f Modelfile && ollama run {record['name']}"
    )
