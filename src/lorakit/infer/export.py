"""``lorakit export``: the adapter out of lorakit, verified. ``export()`` dispatches every format
(hf here; gguf and gguf-lora in gguf.py; ollama in ollama.py), records the result in the export
folder's ``export.json`` and in the adapter's manifest, and fails (exit 1) on a failed verification.

``--to hf`` is a merged model folder (``lorakit merge``'s, same shared steps in merge.py) plus:
- the tokenizer's ``chat_template`` is the adapter's TRAINING template (the template policy's answer
  for the adapter), so ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` in
  transformers, vLLM or TGI renders lorakit's prompt. A ``chat`` template is its recorded Jinja; an
  alpaca-kind template becomes a Jinja template that reproduces ``PromptTemplate.build_prompt``
  (``alpaca_chat_template``);
- ``generation_config.json`` stops where lorakit stops: ``eos_token_id`` is EOS plus the template's
  marker tokens, and ``stop_strings`` holds the markers that are plain text (alpaca's headers).

Verification (verify.py holds the prompts, the reference, the figures and the thresholds): the staged
tokenizer, loaded fresh, must give token ids identical to lorakit's ``prompt_ids_for`` on every check
conversation; then the staged folder, loaded with plain transformers, answers greedily through its
own chat template and generation config, and reads lorakit's answers (teacher forced) for top-1
agreement and KL. A failed check keeps the folder, marked unverified (``UNVERIFIED.txt``,
``"verified": false``), and exits 1. Any other error leaves nothing (written to a staging folder,
renamed into place at the end).
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..data.records import Turn
from ..data.templates import PromptTemplate
from ..data.tokenize import leading_special_ids
from ..errors import LorakitError
from ..files import atomic_write_json, atomic_write_text, staged_folder
from ..runfolder import EXPORT_RECORD, UNVERIFIED_MARKER
from .generate import prompt_ids_for
from .merge import check_merge_args, load_merged, merged_bytes, save_merged
from .stops import cut_at_stop
from .verify import (
    VERIFY_NEW_TOKENS,
    VERIFY_PROMPTS,
    Conversation,
    Reference,
    VerificationFailed,
    VerifySet,
    compare,
    describe,
    free_memory,
    gate,
    reference_for,
    teacher_forced_logprobs,
    verification_set,
)

FORMATS = ("hf", "gguf", "gguf-lora", "ollama", "vllm")


class ExportError(LorakitError):
    """An export that could not be written (nothing is left behind)."""


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


@torch.no_grad()
def hf_candidate(folder: Path, template: PromptTemplate, reference: Reference) -> tuple[list[str], list, float]:
    """The staged folder with plain transformers: greedy answers through its own chat template and
    generation_config (EOS + marker ids, stop_strings), cut at the markers; its log-probs at the
    reference's answer positions (teacher forced); its tokens/s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    stops = template.stops(tokenizer)
    extra: dict[str, Any] = {"tokenizer": tokenizer} if model.generation_config.stop_strings else {}
    answers, generated, seconds = [], 0, 0.0
    for conv in reference.vset.prompts:
        ids = tokenizer.apply_chat_template(
            messages_for(template, conv), add_generation_prompt=True, tokenize=True, return_tensors="pt"
        )
        ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to(model.device)
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=reference.new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            **extra,
        )
        seconds += time.perf_counter() - start
        generated += out.shape[1] - ids.shape[1]
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        answers.append(cut_at_stop(text, stops.strings)[0].strip())
    logits = [teacher_forced_logprobs(model, p, a) for p, a in zip(reference.prompt_ids, reference.answer_ids)]
    del model
    free_memory()
    return answers, logits, generated / seconds if seconds > 0 else 0.0


def verify_hf(
    staging: Path, reference: Reference, template: PromptTemplate, tokenizer, min_top1: float | None = None
) -> dict:
    """The hf export's figures (verify.compare + the chat template check), gated as ``hf``."""
    conversations = CHECK_CONVERSATIONS + reference.vset.prompts
    identical, problems = check_prompt_ids(staging, template, tokenizer, conversations)
    figures: dict[str, Any] = {"template_checked": len(conversations), "template_identical": identical}
    if problems:
        raise VerificationFailed(
            f"verification failed: the exported chat template's token ids differ from lorakit's prompt for "
            f"{len(problems)} of {len(conversations)} conversations (first: {problems[0]})",
            figures,
        )
    answers, logits, tps = hf_candidate(staging, template, reference)
    figures.update(compare(reference, answers, logits, tps))
    return gate(figures, "hf", min_top1)


# ---- portability (every export target) --------------------------------------------------------

TARGETS = FORMATS
LORA_ONLY_TARGETS = ("gguf-lora",)  # and ollama with --lora-only: the adapter itself goes to llama.cpp
LLAMA_CPP_LORA_REFUSED = ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings")


def _base_identities(adapter_dir: Path) -> list[str]:
    from ..runfolder import read_adapter_config, read_manifest

    """The base an adapter was trained on, by lorakit's manifest (its name and resolved path), else by
    peft's base_model_name_or_path."""
    manifest = read_manifest(adapter_dir) or {}
    found = [manifest.get("base_model"), manifest.get("base_model_path")]
    if not any(found):
        found = [(read_adapter_config(adapter_dir) or {}).get("base_model_name_or_path")]
    return [str(x) for x in found if x]


def _base_key(name: str) -> str:
    """A base's identity: a built-in alias is its cache folder, an existing folder its real path."""
    from ..models.registry import ALIASES, _models_dir

    path = _models_dir() / name if name in ALIASES else Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _same_base(a: str, b: str) -> bool:
    return a == b or _base_key(a) == _base_key(b)


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


# ---- the record -------------------------------------------------------------------------------


def file_entry(path: Path) -> dict:
    """Name, size and sha256 of one exported file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def tool_versions() -> dict:
    """The versions an export depends on (recorded beside its figures)."""
    import importlib.metadata

    from .. import __version__

    found = {"lorakit": __version__}
    for name in ("llama-cpp-python", "gguf", "transformers", "peft", "torch", "safetensors"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def unverified_name(name: str) -> str:
    """A file name that says its export failed verification: model-q8_0.gguf -> model-q8_0-UNVERIFIED.gguf."""
    path = Path(name)
    return path.name if path.stem.endswith("-UNVERIFIED") else f"{path.stem}-UNVERIFIED{path.suffix}"


def finish_record(
    staging: Path, record: dict, verify: bool, failure: VerificationFailed | None, artifacts: list[Path]
) -> None:
    """Complete ``record`` (verified, files with sha256, versions) and write it, with the
    UNVERIFIED marker when the verification failed, into ``staging``."""
    record["verified"] = bool(verify and failure is None)
    if not verify:
        record["verification"] = None
        record["verification_note"] = "skipped (--no-verify): this export was not compared with lorakit"
    elif failure is not None:
        record["verification"] = {**failure.figures, "passed": False, "error": failure.reason}
    record["files"] = [file_entry(p) for p in artifacts]
    record["versions"] = tool_versions()
    record["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if failure is not None:
        atomic_write_text(
            staging / UNVERIFIED_MARKER,
            "This export FAILED its verification against lorakit's own answers: do not deploy it.\n"
            f"{failure.reason}\nThe figures are in {EXPORT_RECORD}.\n",
        )
    atomic_write_json(staging / EXPORT_RECORD, record)


def placed(record: dict, out: Path, failure: VerificationFailed | None) -> dict:
    """The record of an export now at ``out``; a failed verification raises, naming where it was kept."""
    record = {**record, "out": str(out)}
    if failure is not None:
        raise VerificationFailed(
            f"{failure.reason}; kept at {out} marked unverified ({EXPORT_RECORD}: verified false); do not deploy it",
            failure.figures,
            record,
            failure.reason,
        )
    return record


def add_to_manifest(adapter_dir: Path, record: dict) -> str | None:
    """Append the export (format, quant, where, files with sha256 and size, figures, versions) to the
    adapter's manifest.json; returns why not when it cannot (no lorakit manifest, read-only)."""
    from ..runfolder import MANIFEST, read_manifest

    manifest = read_manifest(adapter_dir)
    if manifest is None:
        return f"{adapter_dir} has no lorakit {MANIFEST}"
    figures = record.get("verification") or {}
    entry = {
        "format": record["format"],
        "quant": record.get("quant"),
        "out": str(Path(record["out"]).resolve()),
        "created": record.get("created"),
        "verified": record.get("verified", False),
        "files": record.get("files", []),
        "figures": {k: figures.get(k) for k in SUMMARY_FIGURES if k in figures},
        "versions": record.get("versions", {}),
    }
    manifest["exports"] = [*(manifest.get("exports") or []), entry]
    try:
        atomic_write_json(adapter_dir / MANIFEST, manifest)
    except OSError as e:
        return f"{adapter_dir / MANIFEST}: {e.strerror or e}"
    return None


SUMMARY_FIGURES = (
    "prompts",
    "prompts_source",
    "greedy_identical",
    "top1_agreement",
    "mean_kl",
    "tokens_compared",
    "tokens_per_s",
    "min_greedy_identical_share",
    "min_top1_agreement",
    "passed",
)


# ---- a QLoRA adapter's base ---------------------------------------------------------------------


def choose_qlora_base(
    adapter_dir: Path, base: str | None, vset: VerifySet | None, merged: bool, trust_remote_code: bool = False
) -> dict | None:
    """For an adapter trained in 4-bit (QLoRA): merge it into the original base and into the
    de-quantized 4-bit base (the weights training saw), score both by the mean NLL of the
    verification examples' own answers, and keep the lower. None for any other adapter. Without
    answers to score (fixed prompts, --no-verify) the de-quantized base is kept, and said so. A GGUF
    LoRA is applied by llama.cpp to the original base: recorded, not chosen."""
    from .qlora_base import trained_in_4bit
    from .verify import reference_nll

    settings = trained_in_4bit(adapter_dir)
    if settings is None:
        return None
    choice: dict[str, Any] = {"trained_in_4bit": settings}
    if not merged:
        return {**choice, "kept": "original", "note": "a GGUF LoRA is applied by llama.cpp to the original base"}
    if vset is None or not any(c.output for c in vset.prompts):
        why = "--no-verify" if vset is None else f"no reference answers in {vset.source}"
        return {**choice, "kept": "dequantized", "note": f"not scored ({why}): the weights training saw"}
    scores = {}
    for kind in ("original", "dequantized"):
        merged_model = load_merged(
            adapter_dir, base, "fp32", trust_remote_code, settings if kind != "original" else None
        )
        scores[kind], tokens = reference_nll(merged_model.model, merged_model.tokenizer, merged_model.template, vset)
        del merged_model
        free_memory()
    kept = "dequantized" if scores["dequantized"] <= scores["original"] else "original"
    return {
        **choice,
        "kept": kept,
        "mean_nll": {k: round(v, 5) for k, v in scores.items()},
        "tokens": tokens,
        "scored_on": vset.source,
        "note": "mean NLL of the verification examples' own answers, merged into each base; the lower is kept",
    }


def qlora_base_weights(qlora: dict | None) -> dict | None:
    """The 4-bit settings to de-quantize the base with, when the de-quantized base was kept."""
    return qlora["trained_in_4bit"] if qlora and qlora.get("kept") == "dequantized" else None


# ---- export ------------------------------------------------------------------------------------


def export_vllm(specs: list[str], out: str | Path, **options) -> dict:
    """``--to vllm`` (vllm_deploy.export_vllm): the deploy folder, then an ``exports`` entry in each
    adapter's manifest with that adapter's own figures."""
    from .vllm_deploy import export_vllm as write

    try:
        record = write(specs, Path(out), **options)
    except VerificationFailed as e:
        if e.record:
            e.record["manifest"] = _add_deploy_to_manifests(e.record)
        raise
    record["manifest"] = _add_deploy_to_manifests(record)
    return record


def _add_deploy_to_manifests(record: dict) -> str:
    notes = []
    for entry in record["adapters"]:
        figures = entry.get("verification")
        one = {**record, "verification": figures, "verified": bool(record.get("verified") and figures)}
        why = add_to_manifest(Path(entry["source"]), one)
        if why:
            notes.append(why)
    return "; ".join(notes) or "recorded"


def export(
    adapter: str | Path,
    out: str | Path,
    to: str = "hf",
    *,
    base: str | None = None,
    dtype: str | None = None,
    quant: str = "q8_0",
    lora_only: bool = False,
    force: bool = False,
    verify: bool = True,
    verify_data: str | Path | None = None,
    verify_prompts: int = VERIFY_PROMPTS,
    verify_new_tokens: int = VERIFY_NEW_TOKENS,
    min_top1: float | None = None,
    llama_cpp_dir: str | None = None,
    trust_remote_code: bool = False,
    vllm: dict | None = None,
) -> dict:
    """Export ``adapter`` as ``to`` at ``out`` and record it in the adapter's manifest; returns the
    export record. ``--to vllm``: ``adapter`` may be a list of NAME=DIR; ``vllm`` holds its own
    options (vllm_python_path, served_name, max_lora_rank, max_loras, runtime_lora, template).
    Refusals come first (check_portability); a failed verification raises VerificationFailed after
    the artifact is placed and recorded as unverified."""
    from .adapters import check_adapter_dir

    if to not in FORMATS:
        raise ExportError(f"--to: '{to}' is not one of {', '.join(FORMATS)}")
    if to == "vllm":
        return export_vllm(
            [str(a) for a in adapter] if isinstance(adapter, (list, tuple)) else [str(adapter)],
            out,
            base=base,
            dtype=dtype or "auto",
            force=force,
            verify=verify,
            verify_data=verify_data,
            verify_prompts=verify_prompts,
            new_tokens=verify_new_tokens,
            min_top1=min_top1,
            trust_remote_code=trust_remote_code,
            **(vllm or {}),
        )
    dtype = dtype or "fp32"
    if lora_only and to != "ollama":
        raise ExportError(f"--lora-only: only for --to ollama (--to gguf-lora writes the GGUF LoRA), not --to {to}")
    check_portability(adapter, to, base, lora_only=lora_only)
    adapter_dir = check_adapter_dir(adapter)
    vset = verification_set(adapter_dir, verify_data, verify_prompts) if verify else None
    merged_target = to in ("hf", "gguf") or (to == "ollama" and not lora_only)
    qlora = choose_qlora_base(adapter_dir, base, vset, merged_target, trust_remote_code)
    common = dict(
        base=base,
        force=force,
        verify=verify,
        vset=vset,
        new_tokens=verify_new_tokens,
        min_top1=min_top1,
        trust_remote_code=trust_remote_code,
        qlora=qlora,
    )
    try:
        if to == "hf":
            record = export_hf(adapter_dir, Path(out), dtype=dtype, **common)
        elif to == "ollama":
            from .ollama import export_ollama

            record = export_ollama(
                adapter_dir, Path(out), quant=quant, lora_only=lora_only, llama_cpp_dir=llama_cpp_dir, **common
            )
        else:
            from . import gguf

            step = gguf.export_gguf if to == "gguf" else gguf.export_gguf_lora
            extra = {"quant": quant} if to == "gguf" else {}
            record = step(adapter_dir, Path(out), llama_cpp_dir=llama_cpp_dir, **extra, **common)
    except VerificationFailed as e:
        if e.record:
            e.record["manifest"] = add_to_manifest(adapter_dir, e.record) or "recorded"
        raise
    record["manifest"] = add_to_manifest(adapter_dir, record) or "recorded"
    return record


def export_adapter(adapter: str | Path, out: str | Path, to: str = "hf", **kwargs) -> dict:
    """``export`` under its earlier name."""
    return export(adapter, out, to, **kwargs)


def export_hf(
    adapter: str | Path,
    out: Path,
    *,
    base: str | None = None,
    dtype: str = "fp32",
    force: bool = False,
    verify: bool = True,
    vset: VerifySet | None = None,
    reference: Reference | None = None,
    new_tokens: int = VERIFY_NEW_TOKENS,
    min_top1: float | None = None,
    trust_remote_code: bool = False,
    qlora: dict | None = None,
) -> dict:
    """The merged folder for ``--to hf`` (also the first step of ``--to gguf``, unverified there).
    ``qlora``: choose_qlora_base's answer for a QLoRA adapter (which base it is merged into)."""
    check_portability(adapter, "hf", base)
    adapter_dir, out = check_merge_args(adapter, out, dtype, force)
    base_weights = qlora_base_weights(qlora)
    merged = load_merged(adapter_dir, base, dtype, trust_remote_code, base_weights)
    template, tokenizer = merged.template, merged.tokenizer
    stops = template.stops(tokenizer)
    tokenizer.chat_template = export_chat_template(template, tokenizer)
    record: dict[str, Any] = {
        "format": "hf",
        "quant": dtype,
        "template": template.name,
        "template_kind": template.kind,
        "stops": {"strings": list(stops.strings), "token_ids": list(stops.token_ids)},
        "dtype": dtype,
        "adapter": str(adapter_dir.resolve()),
        "base_model": merged.base,
    }
    if qlora:
        record["qlora_base"] = qlora
    failure = None
    with staged_folder(out, "exporting", needed=merged_bytes(merged, out)) as staging:
        save_merged(merged, staging)
        record["generation_config"] = write_generation_config(staging, merged.model, template, tokenizer)
        merged.model = None  # free the merged copy before the verification copies load
        free_memory()
        if verify:
            reference = reference_for(
                reference, adapter_dir, merged.base, vset, new_tokens, dtype, trust_remote_code, base_weights
            )
            try:
                record["verification"] = verify_hf(staging, reference, template, tokenizer, min_top1)
            except VerificationFailed as e:
                failure = e
        finish_record(staging, record, verify, failure, sorted(staging.glob("*.safetensors")))
    return placed(record, out, failure)


def summary(record: dict) -> str:
    """What the command prints: where, what, and the verification figures."""
    files = ", ".join(f"{f['name']} ({f['bytes'] / 1e6:.1f} MB)" for f in record.get("files", [])[:3])
    more = f" +{len(record['files']) - 3} more" if len(record.get("files", [])) > 3 else ""
    what = record["format"] + (f" {record['quant']}" if record.get("quant") else "")
    lines = [f"exported {record['adapter']} -> {record['out']} ({what}, template {record['template']})"]
    if files:
        lines.append(f"files: {files}{more}")
    if record.get("quantizer_fallback"):
        lines.append(f"llama.cpp's quantizer: {record['quantizer_fallback']} (widths not a multiple of 256)")
    if record["format"] == "hf":
        g = record["generation_config"]
        lines.append(f"eos_token_id {g['eos_token_id']}, stop_strings {g['stop_strings']}")
    v = record.get("verification")
    if record.get("verified"):
        check = (
            f"chat template ids identical {v['template_identical']}/{v['template_checked']}; "
            if "template_checked" in v
            else ""
        )
        lines.append(f"verified ({v['reference']}): {check}{describe(v)}")
        if v.get("warning"):
            lines.append(f"WARNING: {v['warning']}")
    elif v:
        lines.append(f"FAILED verification: {describe(v)}")
    else:
        lines.append("NOT verified (--no-verify): nothing compared this export with lorakit")
    if record.get("manifest") and record["manifest"] != "recorded":
        lines.append(f"not added to the adapter's manifest: {record['manifest']}")
    return "\n".join(lines)
