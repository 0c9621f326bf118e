"""``lorakit export --to hf``: a merged model folder that other tools prompt exactly as training did.

The folder is ``lorakit merge``'s (same shared steps in merge.py) plus:
- the tokenizer's ``chat_template`` is the adapter's TRAINING template (the template policy's answer
  for the adapter), so ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` in
  transformers, vLLM or TGI renders lorakit's prompt. A ``chat`` template is its recorded Jinja; an
  alpaca-kind template becomes a Jinja template that reproduces ``PromptTemplate.build_prompt``
  (``alpaca_chat_template``);
- ``generation_config.json`` stops where lorakit stops: ``eos_token_id`` is EOS plus the template's
  marker tokens, and ``stop_strings`` holds the markers that are plain text (alpaca's headers).

Before the folder is moved into place it is verified: the staged tokenizer, loaded fresh, must give
token ids identical to lorakit's ``prompt_ids_for`` on every check conversation, and the staged model,
loaded with plain transformers, must give the same greedy answers as lorakit's Generator
(base + adapter) on at least MIN_ANSWER_AGREEMENT of the verification prompts. Otherwise nothing is
written and the export fails with one error line. The figures go to ``lorakit_export.json``.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.records import Turn
from ..data.templates import PromptTemplate
from ..data.tokenize import leading_special_ids
from ..errors import LorakitError
from ..files import atomic_write_json, staged_folder
from ..runfolder import EXPORT_RECORD, read_config_record, run_of
from .generate import GenerationParams, Generator, prompt_ids_for
from .merge import DTYPES, check_merge_args, load_merged, save_merged
from .stops import cut_at_stop

FORMATS = ("hf", "gguf", "gguf-lora")  # gguf, gguf-lora: gguf.py (llama.cpp's converter)
MIN_ANSWER_AGREEMENT = 0.9  # fewer identical greedy answers than this fails the export
VERIFY_PROMPTS = 8  # greedy answers compared
VERIFY_NEW_TOKENS = 32

FIXED_PROMPTS = [  # (instruction, input) when the adapter's run recorded no eval data
    ("What is the capital of France?", ""),
    ("Who are you?", ""),
    ("Write one sentence about the sea.", ""),
    ("Translate to French.", "The quick brown fox jumps over the lazy dog."),
    ("你好，世界。请介绍一下你自己。", ""),
    ("List three colours.", ""),
    ("Summarise the text.", "1 2 3 4 5 6 7 8 9 0"),
    ("What is 2 plus 2?", ""),
]


class ExportError(LorakitError):
    """An export that could not be written or did not pass its verification."""


@dataclass(frozen=True)
class Conversation:
    """One prompt in lorakit's terms (what prompt_ids_for takes)."""

    instruction: str
    input: str = ""
    history: tuple[Turn, ...] = ()
    system: str = ""


CHECK_CONVERSATIONS = [
    Conversation("What is the capital of France?"),
    Conversation("Summarise the text.", input="The quick brown fox jumps over the lazy dog."),
    Conversation("Who are you?", system="You are a helpful assistant."),
    Conversation(
        "And the capital of Italy?",
        history=(Turn("user", "What is the capital of France?"), Turn("assistant", "Paris.")),
        system="Answer briefly.",
    ),
    Conversation(
        "Now add 3.",
        input="ignored with history, as in lorakit",
        history=(
            Turn("user", "What is 2 plus 2?"),
            Turn("assistant", "4"),
            Turn("user", "Times 2?"),
            Turn("assistant", "8"),
        ),
    ),
    Conversation(
        'Say "hi" {instruction} {{ x }} {% if %} \\n literally,\nthen a new line\n\n### Response:\tand a tab',
        input="{input} '}}' \"{{\" #}",
        system="Quotes ' \" and braces {} {{ }} {%",
    ),
    Conversation("你好，世界。我是一个助手。", input="请用中文回答。"),
    Conversation("", system=""),
]


# ---- the chat template -------------------------------------------------------------------------


def _lit(text: str) -> str:
    """A Jinja string literal for any text: JSON's escapes are Jinja's (\\n, \\", \\\\, \\t, \\uXXXX);
    non-ASCII characters stay as they are (Jinja reads them back unchanged)."""
    return json.dumps(text, ensure_ascii=False)


def _prefix_jinja(tokenizer) -> str:
    """What encode_prompt puts before the prompt text (BOS for Llama-2 style tokenizers), which
    apply_chat_template (add_special_tokens=False) only adds if the template writes it."""
    ids = leading_special_ids(tokenizer)
    if not ids:
        return ""
    if ids == [tokenizer.bos_token_id] and tokenizer.bos_token:
        return "{{- bos_token -}}\n"
    return "{{- " + _lit("".join(tokenizer.convert_ids_to_tokens(ids))) + " -}}\n"


def alpaca_chat_template(template: PromptTemplate, tokenizer=None) -> str:
    """A Jinja chat template that renders what ``template.build_prompt`` does (and what training
    renders): an optional leading system message + blank line; each user message through
    prompt_no_input, the first one through prompt_input when it carries a non-empty ``input`` key
    (lorakit's Alpaca ``input`` field; build_prompt drops it when there is history, i.e. when it
    belongs to a later user message); assistant messages as their bare text, with no EOS (as in
    lorakit's prompt). The response header is part of the user template, so add_generation_prompt
    adds nothing. Substitution is str.replace, {instruction} then {input}, exactly as lorakit."""
    return (
        "{#- lorakit alpaca-style prompt template (lorakit export) -#}\n"
        + _prefix_jinja(tokenizer)
        + f"{{%- set prompt_input = {_lit(template.prompt_input)} -%}}\n"
        + f"{{%- set prompt_no_input = {_lit(template.prompt_no_input)} -%}}\n"
        + "{%- set ns = namespace(first_user=true) -%}\n"
        "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'system' -%}\n"
        "{%- if not loop.first -%}{{- raise_exception('only the first message may be a system message') -}}"
        "{%- endif -%}\n"
        "{%- if message['content'] -%}{{- message['content'] + '\\n\\n' -}}{%- endif -%}\n"
        "{%- elif message['role'] == 'user' -%}\n"
        "{%- set inp = message['input'] if ns.first_user and message['input'] is defined and message['input'] "
        "else '' -%}\n"
        "{%- set ns.first_user = false -%}\n"
        "{%- set tpl = prompt_input if inp else prompt_no_input -%}\n"
        "{{- tpl | replace('{instruction}', message['content']) | replace('{input}', inp) -}}\n"
        "{%- elif message['role'] == 'assistant' -%}\n"
        "{{- message['content'] -}}\n"
        "{%- else -%}\n"
        "{{- raise_exception('roles must be system, user or assistant') -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
    )


def export_chat_template(template: PromptTemplate, tokenizer) -> str:
    """The chat template the exported tokenizer carries."""
    if template.kind == "chat":
        jinja = template.chat_template or getattr(tokenizer, "chat_template", None)
        if not isinstance(jinja, str) or not jinja:
            raise ExportError(f"template '{template.name}': no chat template recorded to export")
        prefix = _prefix_jinja(tokenizer)  # lorakit puts the tokenizer's leading tokens first; so does this
        return prefix + jinja if prefix else jinja
    return alpaca_chat_template(template, tokenizer)


def messages_for(template: PromptTemplate, conv: Conversation) -> list[dict[str, str]]:
    """The chat messages a user of the exported folder sends for ``conv``. Alpaca-kind: the input
    rides on the user message it belongs to (``input`` key); chat: lorakit folds it into the
    message text (only without history, as build_prompt)."""
    messages = [{"role": "system", "content": conv.system}] if conv.system else []
    messages += [{"role": t.role, "content": t.content} for t in conv.history]
    last = {"role": "user", "content": conv.instruction}
    if conv.input:
        if template.kind == "alpaca":
            last["input"] = conv.input
        elif not conv.history:
            last["content"] = f"{conv.instruction}\n\n{conv.input}"
    return messages + [last]


# ---- generation config -------------------------------------------------------------------------


def stop_settings(template: PromptTemplate, tokenizer) -> tuple[list[int], list[str]]:
    """(eos_token_id, stop_strings) for generation_config.json: EOS plus the marker tokens, and the
    markers that are not one special token (caught as text)."""
    stops = template.stops(tokenizer)
    by_id = set(stops.token_ids)
    strings = [s for s in stops.strings if tokenizer.convert_tokens_to_ids(s) not in by_id]
    return stops.eos_ids(tokenizer), strings


def write_generation_config(folder: Path, model, template: PromptTemplate, tokenizer) -> dict:
    from transformers import GenerationConfig

    eos_ids, strings = stop_settings(template, tokenizer)
    try:
        config = GenerationConfig.from_pretrained(str(folder))
    except OSError:
        config = GenerationConfig.from_model_config(model.config)
    config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if strings:
        config.stop_strings = strings
    config._from_model_config = False  # else generate may rebuild it from config.json, dropping these
    config.save_pretrained(str(folder))
    return {"eos_token_id": eos_ids, "stop_strings": strings}


# ---- verification ------------------------------------------------------------------------------


def verification_prompts(adapter_dir: Path, n: int = VERIFY_PROMPTS) -> tuple[list[Conversation], str]:
    """Prompts for the answer check: the adapter's run's eval data (eval_data_path) when recorded
    and readable, else FIXED_PROMPTS."""
    from ..data.loader import load_examples

    config = read_config_record(run_of(adapter_dir)) or {}
    paths = config.get("eval_data_path") or []
    paths = [paths] if isinstance(paths, str) else list(paths)
    found: list[Conversation] = []
    used: list[str] = []
    for path in paths:
        try:
            examples = load_examples(path).examples
        except LorakitError:
            continue
        picked = [
            Conversation(e.instruction, input=e.input, system=e.system)
            for e in examples
            if e.text is None and e.turns and e.instruction
        ]
        if picked:
            used.append(str(path))
            found += picked[: n - len(found)]
        if len(found) >= n:
            break
    if found:
        return found, "eval data: " + ", ".join(used)
    return [Conversation(q, input=i) for q, i in FIXED_PROMPTS[:n]], "fixed prompts"


def check_prompt_ids(
    folder: Path, template: PromptTemplate, tokenizer, conversations: list[Conversation]
) -> tuple[int, list[str]]:
    """(identical, problems): the staged tokenizer, loaded fresh, against lorakit's prompt ids."""
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(str(folder))
    identical, problems = 0, []
    for conv in conversations:
        want = prompt_ids_for(template, tokenizer, conv.instruction, conv.input, list(conv.history), conv.system)
        try:
            got = exported.apply_chat_template(
                messages_for(template, conv), add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        except Exception as e:  # a template error is a failed check, reported as such
            problems.append(f"{conv.instruction[:40]!r}: {type(e).__name__}: {e}")
            continue
        if list(got) == list(want):
            identical += 1
        else:
            problems.append(f"{conv.instruction[:40]!r}: {len(got)} ids vs lorakit's {len(want)}")
    return identical, problems


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def exported_answers(
    folder: Path, template: PromptTemplate, prompts: list[Conversation], max_new_tokens: int
) -> list[str]:
    """Greedy answers of the staged folder with plain transformers: its tokenizer's chat template,
    its generation_config (EOS + marker ids, stop_strings); the answer cut at the markers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    stops = template.stops(tokenizer)
    extra: dict[str, Any] = {"tokenizer": tokenizer} if model.generation_config.stop_strings else {}
    answers = []
    for conv in prompts:
        ids = tokenizer.apply_chat_template(
            messages_for(template, conv), add_generation_prompt=True, tokenize=True, return_tensors="pt"
        )
        ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to(model.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            **extra,
        )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        answers.append(cut_at_stop(text, stops.strings)[0].strip())
    del model
    _free()
    return answers


def lorakit_answers(
    adapter_dir: Path,
    base: str,
    prompts: list[Conversation],
    max_new_tokens: int,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
) -> list[str]:
    """Lorakit's own greedy answers: Generator with base + adapter, in the export's dtype."""
    gen = Generator(base=base, adapter=str(adapter_dir), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    params = GenerationParams(max_new_tokens=max_new_tokens)
    answers = [gen.generate(c.instruction, c.input, list(c.history), c.system, params=params) for c in prompts]
    del gen
    _free()
    return answers


# ---- portability (every export target) --------------------------------------------------------

TARGETS = ("hf", "gguf", "gguf-lora", "ollama")
LORA_ONLY_TARGETS = ("gguf-lora",)  # and ollama with --lora-only: the adapter itself goes to llama.cpp
LLAMA_CPP_LORA_REFUSED = ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings")


def _base_identities(adapter_dir: Path) -> list[str]:
    from ..runfolder import read_adapter_config, read_manifest

    manifest = read_manifest(adapter_dir) or {}
    config = read_adapter_config(adapter_dir) or {}
    found = [manifest.get("base_model"), manifest.get("base_model_path"), config.get("base_model_name_or_path")]
    return [str(x) for x in found if x]


def _same_base(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_portability(adapter_dir: str | Path, target: str, base: str | None = None, *, lora_only: bool = False):
    """Refuse, before any work, an export the target cannot carry: one LorakitError line each.

    Every target: ``--base`` must be the base the adapter was trained on (its manifest's base_model /
    base_model_path, or peft's base_model_name_or_path). A LoRA exported as such (gguf-lora, ollama
    --lora-only), which llama.cpp applies itself: no DoRA, no int8 adapter, no modules_to_save or
    embedding / lm_head targets (merging carries all of these)."""
    from ..runfolder import read_adapter_config
    from .adapters import adapter_format, check_adapter_dir

    if target not in TARGETS:
        raise ExportError(f"--to: '{target}' is not one of {', '.join(TARGETS)}")
    adapter_dir = check_adapter_dir(adapter_dir)
    if base:
        recorded = _base_identities(adapter_dir)
        if recorded and not any(_same_base(base, r) for r in recorded):
            raise ExportError(
                f"--base: {base} is not the base this adapter was trained on ({recorded[0]}); "
                f"an adapter only works on its own base: drop --base or pass --base {recorded[0]}"
            )
    if not (lora_only or target in LORA_ONLY_TARGETS):
        return
    what = f"--to {target}" + (" --lora-only" if target not in LORA_ONLY_TARGETS else "")
    config = read_adapter_config(adapter_dir) or {}
    if config.get("use_dora"):
        raise ExportError(
            f"{what}: {adapter_dir} is a DoRA adapter, which llama.cpp's LoRA cannot apply; merge it instead"
            f" (--to {'ollama' if target == 'ollama' else 'gguf'} without --lora-only)"
        )
    if adapter_format(adapter_dir) == "int8":
        raise ExportError(
            f"{what}: {adapter_dir} is an int8 adapter (lorakit adapter quantize), which a GGUF LoRA cannot carry; "
            "export the float adapter it was quantized from"
        )
    saved = [str(m) for m in config.get("modules_to_save") or []]
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    refused = saved + [t for t in targets if any(n in t for n in LLAMA_CPP_LORA_REFUSED)]
    if refused:
        raise ExportError(
            f"{what}: {adapter_dir} trains {', '.join(refused)} (modules_to_save / embedding / lm_head), which "
            "llama.cpp's LoRA cannot adapt; merge it instead (without --lora-only)"
        )


# ---- export ------------------------------------------------------------------------------------


def export_adapter(
    adapter: str | Path,
    out: str | Path,
    to: str = "hf",
    base: str | None = None,
    dtype: str = "fp32",
    force: bool = False,
    verify: bool = True,
    verify_prompts: int = VERIFY_PROMPTS,
    verify_new_tokens: int = VERIFY_NEW_TOKENS,
    trust_remote_code: bool = False,
    quant: str = "q8_0",
    llama_cpp_dir: str | None = None,
) -> dict:
    """Export ``adapter`` as ``to`` at ``out``: hf (merged into its base) here; gguf (merged, ``quant``)
    and gguf-lora in gguf.py. Returns the export record."""
    if to not in FORMATS:
        raise ExportError(f"--to: '{to}' is not one of {', '.join(FORMATS)}")
    if to != "hf":
        from . import gguf

        kwargs = dict(
            base=base,
            verify=verify,
            llama_cpp_dir=llama_cpp_dir,
            force=force,
            verify_prompts=verify_prompts,
            verify_new_tokens=verify_new_tokens,
            trust_remote_code=trust_remote_code,
        )
        if to == "gguf":
            return gguf.export_gguf(adapter, Path(out), quant=quant, **kwargs)
        return gguf.export_gguf_lora(adapter, Path(out), **kwargs)
    check_portability(adapter, to, base)
    adapter_dir, out = check_merge_args(adapter, out, dtype, force)
    merged = load_merged(adapter_dir, base, dtype, trust_remote_code)
    template, tokenizer = merged.template, merged.tokenizer
    stops = template.stops(tokenizer)
    tokenizer.chat_template = export_chat_template(template, tokenizer)
    record: dict[str, Any] = {
        "format": to,
        "template": template.name,
        "template_kind": template.kind,
        "stops": {"strings": list(stops.strings), "token_ids": list(stops.token_ids)},
        "dtype": dtype,
        "adapter": str(adapter_dir.resolve()),
        "base_model": merged.base,
    }
    with staged_folder(out, "exporting") as staging:
        save_merged(merged, staging)
        record["generation_config"] = write_generation_config(staging, merged.model, template, tokenizer)
        merged.model = None  # free the merged copy before the verification copies load
        _free()
        if verify:
            record["verification"] = _verify(
                staging,
                out,
                merged.base,
                adapter_dir,
                template,
                tokenizer,
                verify_prompts,
                verify_new_tokens,
                dtype,
                trust_remote_code,
            )
        else:
            record["verification"] = None
        atomic_write_json(staging / EXPORT_RECORD, record)
    return {**record, "out": str(out)}


def _verify(
    staging: Path,
    out: Path,
    base: str,
    adapter_dir: Path,
    template: PromptTemplate,
    tokenizer,
    n_prompts: int,
    new_tokens: int,
    dtype: str,
    trust_remote_code: bool,
) -> dict:
    prompts, source = verification_prompts(adapter_dir, n_prompts)
    conversations = CHECK_CONVERSATIONS + prompts
    ids_identical, problems = check_prompt_ids(staging, template, tokenizer, conversations)
    if problems:
        raise ExportError(
            f"export verification failed: the exported chat template's token ids differ from lorakit's prompt "
            f"for {len(problems)} of {len(conversations)} conversations (first: {problems[0]}); "
            f"nothing was written to {out}"
        )
    ours = lorakit_answers(adapter_dir, base, prompts, new_tokens, dtype, trust_remote_code)
    theirs = exported_answers(staging, template, prompts, new_tokens)
    same = sum(a == b for a, b in zip(ours, theirs))
    figures = {
        "ids_checked": len(conversations),
        "ids_identical": ids_identical,
        "answers_checked": len(prompts),
        "answers_identical": same,
        "answers_source": source,
        "max_new_tokens": new_tokens,
        "min_answer_agreement": MIN_ANSWER_AGREEMENT,
        "reference": f"lorakit Generator, base + adapter, {dtype}",
    }
    if same < MIN_ANSWER_AGREEMENT * len(prompts):
        raise ExportError(
            f"export verification failed: only {same}/{len(prompts)} greedy answers of the exported model equal "
            f"lorakit's (base + adapter), below {MIN_ANSWER_AGREEMENT:.0%}; nothing was written to {out}"
        )
    return figures


def summary(record: dict) -> str:
    if record["format"] != "hf":
        from .gguf import summary as gguf_summary

        return gguf_summary(record)
    lines = [
        f"exported {record['adapter']} -> {record['out']} ({record['format']}, {record['dtype']}, "
        f"template {record['template']})",
        f"eos_token_id {record['generation_config']['eos_token_id']}, "
        f"stop_strings {record['generation_config']['stop_strings']}",
    ]
    v = record.get("verification")
    if v:
        lines.append(
            f"verified: chat template ids identical {v['ids_identical']}/{v['ids_checked']}, "
            f"greedy answers identical {v['answers_identical']}/{v['answers_checked']} ({v['answers_source']})"
        )
    else:
        lines.append("not verified (--no-verify)")
    return "\n".join(lines)
