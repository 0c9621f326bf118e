"""``lorakit export --to gguf`` and ``--to gguf-lora``: files for llama.cpp, Ollama and LM Studio,
written by llama.cpp's OWN converter (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``) and
quantizer (llama-cpp-python's ``llama_model_quantize``, or ``llama-quantize`` on PATH).

- ``--to gguf``: the adapter is exported merged (``export --to hf``, so the tokenizer carries the
  TRAINING template as its chat_template), converted to f32/f16/bf16/q8_0 by the converter, and to a
  k-quant (q4_k_m, q5_k_m, q6_k) by the quantizer from an f16 intermediate.
- ``--to gguf-lora``: the adapter converted by convert_lora_to_gguf.py, plus an f16 GGUF of the base
  (with the training template) beside it, for ``llama-cli -m BASE --lora LORA`` / Ollama ADAPTER.
  DoRA adapters are refused: merge them with ``--to gguf``.

Where llama.cpp's scripts come from (``find_llama_cpp``): ``--llama-cpp DIR`` / ``LORAKIT_LLAMA_CPP`` (a
llama.cpp checkout), else the sdist of the INSTALLED llama-cpp-python, fetched once from PyPI with
``pip download`` into lorakit's cache; only its convert scripts, ``conversion/`` and ``gguf-py`` are kept.

Verification (on by default; verify.py holds the prompts, reference, figures and thresholds): the
GGUF's ``tokenizer.chat_template`` must be the training template and must render lorakit's prompt
(same token ids), its EOS must be the tokenizer's; then llama.cpp (``llama_cpp.Llama``) answers the
verification prompts greedily from lorakit's prompt ids, and reads lorakit's prompt + answer for
top-1 agreement and KL against lorakit's Generator (base + adapter, fp32). The figures go to
export.json; a failed check keeps the file as ``*-UNVERIFIED.gguf`` and exits 1.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..files import staged_folder
from ..runfolder import (
    GGUF_SUFFIX,
    LLAMA_CPP_CACHE,
    read_adapter_config,
    recorded_base_model,
)
from .export import (
    CHECK_CONVERSATIONS,
    ExportError,
    check_portability,
    export_chat_template,
    export_hf,
    finish_record,
    messages_for,
    placed,
    qlora_base_weights,
    unverified_name,
)
from .lora_scale import fold_for_llama_cpp
from .verify import (
    VERIFY_NEW_TOKENS,
    Conversation,
    Reference,
    VerificationFailed,
    VerifySet,
    compare,
    gate,
    reference_for,
)

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written directly by convert_hf_to_gguf.py
KQUANT_FTYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
INSTALL_HINT = "pip install 'lorakit[gguf]'"
# modules convert_hf_to_gguf.py imports (a Llama vocab is tried with sentencepiece first) -> pip name
CONVERTER_MODULES = {
    "sentencepiece": "sentencepiece",
    "numpy": "numpy",
    "torch": "torch",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "yaml": "pyyaml",
}
_KEEP = re.compile(r"^(convert_hf_to_gguf\.py|convert_lora_to_gguf\.py|conversion/.*|gguf-py/.*)$")


# ---- llama.cpp's tools -------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaCpp:
    """A folder with llama.cpp's convert scripts, conversion/ and gguf-py."""

    root: Path
    source: str

    def script(self, name: str) -> Path:
        return self.root / name

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.root / "gguf-py"), str(self.root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env


def physical_cores(cpus: set[int] | None = None, sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """The physical cores among the CPUs this process may run on (its affinity): SMT siblings count once.

    Read from /sys/devices/system/cpu/cpuN/topology (package id, core id); where that cannot be read
    (not Linux), half the logical CPUs, as llama-cpp-python guesses."""
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(
                ((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip())
            )
        except OSError:
            return max(len(cpus) // 2, 1)
    return max(len(cores), 1)


def llama_threads() -> dict[str, int]:
    """llama.cpp's decode and prompt threads: one per physical core this process may use.

    llama-cpp-python's default decode thread count is half the logical CPUs, a guess that the CPU has
    two hardware threads per core; on a machine without SMT (most cloud VMs' vCPUs here) it leaves
    half the cores idle: 24 vs 36 tokens/s at batch 1 on the 2-core project VM (docs/performance.md)."""
    n = physical_cores()
    return {"n_threads": n, "n_threads_batch": n}


def llama_cpp_python_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def _need_binding(what: str):
    """The llama_cpp module, or the one-line install hint."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError(f"{what} needs llama.cpp: {INSTALL_HINT}") from e
    return llama_cpp


def find_llama_cpp(llama_cpp_dir: str | Path | None = None) -> LlamaCpp:
    """--llama-cpp DIR / LORAKIT_LLAMA_CPP, else the installed llama-cpp-python's sources (cached)."""
    given = llama_cpp_dir or os.environ.get("LORAKIT_LLAMA_CPP")
    if given:
        root = Path(given).expanduser()
        missing = [
            n for n in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py") if not (root / n).exists()
        ]
        if missing:
            raise ExportError(f"--llama-cpp: {root} is not a llama.cpp checkout (no {', '.join(missing)})")
        return LlamaCpp(root, str(root.resolve()))
    version = llama_cpp_python_version()
    if version is None:
        raise ExportError(f"--to gguf needs llama.cpp: {INSTALL_HINT}")
    from ..models.registry import lorakit_home

    target = lorakit_home() / LLAMA_CPP_CACHE / f"llama-cpp-python-{version}"
    if not (target / "convert_hf_to_gguf.py").is_file():
        _fetch_llama_cpp_sources(version, target)
    return LlamaCpp(target, f"pypi:llama-cpp-python=={version} (sdist, vendor/llama.cpp)")


def _fetch_llama_cpp_sources(version: str, target: Path) -> None:
    """pip-download the llama-cpp-python sdist (never build or install it) and extract llama.cpp's
    convert scripts, conversion/ and gguf-py into ``target``: into a hidden temp folder, then renamed."""
    from filelock import FileLock

    from ..console import info
    from ..models.registry import pip_download

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / "convert_hf_to_gguf.py").is_file():
            return
        spec = f"llama-cpp-python=={version}"
        info(f"downloading llama.cpp's converter from PyPI ({spec} sources, once)")
        with tempfile.TemporaryDirectory(prefix="lorakit-pip-") as tmp:
            sdists, reason = pip_download(spec, tmp, binary=False)
            if not sdists:
                raise ExportError(
                    f"could not download {spec}'s sources from PyPI: {reason}; "
                    "check the network, or pass --llama-cpp DIR (a llama.cpp checkout)"
                )
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
            try:
                kept = _extract_llama_cpp(sdists[0], staging)
                if not (staging / "convert_hf_to_gguf.py").is_file() or not kept:
                    raise ExportError(f"{sdists[0].name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
                os.rename(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)


def _extract_llama_cpp(sdist: Path, dest: Path) -> int:
    kept = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            name = member.name
            at = name.find("/vendor/llama.cpp/")
            if at < 0 or not member.isfile():
                continue
            rel = name[at + len("/vendor/llama.cpp/") :]
            if not _KEEP.match(rel) or ".." in Path(rel).parts:
                continue
            path = dest / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                continue
            with src, open(path, "wb") as f:
                shutil.copyfileobj(src, f)
            kept += 1
    return kept


def _check_converter_modules() -> None:
    missing = [pip for mod, pip in CONVERTER_MODULES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ExportError(f"llama.cpp's converter needs {', '.join(missing)}: pip install {' '.join(missing)}")


def _die_with_parent() -> None:
    """In the converter's process (Linux): die when lorakit dies, so a killed export leaves no
    converter writing on (prctl PR_SET_PDEATHSIG, SIGKILL); elsewhere nothing."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG = 1, SIGKILL = 9
        except OSError:
            pass


def run_script(tools: LlamaCpp, script: str, args: list[str]) -> None:
    """Run one of llama.cpp's convert scripts with this python; its last error line on failure."""
    _check_converter_modules()
    cmd = [sys.executable, str(tools.script(script))] + args
    result = subprocess.run(cmd, capture_output=True, text=True, env=tools.env(), preexec_fn=_die_with_parent)
    if result.returncode != 0:
        output = result.stderr or result.stdout
        module = re.findall(r"No module named '([^']+)'", output)
        if module:
            raise ExportError(f"llama.cpp's {script} needs {module[-1]}: pip install {module[-1].split('.')[0]}")
        lines = [s.strip() for s in output.splitlines() if s.strip()]
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise ExportError(f"llama.cpp's {script} failed: {reason}")


@contextmanager
def _native_stderr():
    """Capture what native code (llama.cpp's quantizer logs every tensor) writes to file descriptor
    2, so the user's terminal gets lorakit's summary, not hundreds of lines; ``.text`` after the block."""
    import io

    log = SimpleNamespace(text="")
    python_side, python_stderr = io.StringIO(), sys.stderr  # llama-cpp-python's log callback writes here
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        sys.stderr = python_side
        try:
            yield log
        finally:
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            log.text = tmp.read().decode("utf-8", errors="replace") + python_side.getvalue()


def _fallback_note(log: str) -> str | None:
    """llama.cpp's note that tensors whose width is not a multiple of a k-quant's 256-wide block were
    written in another type (e.g. q4_K -> q5_0): the file is not the k-quant its name says."""
    found = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback quantization", log)
    if not found:
        return None
    types = sorted(set(re.findall(r"falling back to\s+(\w+)", log)))
    return f"{found.group(1)} of {found.group(2)} tensors fell back to {', '.join(types) or 'other types'}"


def quantize(src: Path, dst: Path, quant: str) -> tuple[str, str | None]:
    """A k-quant of ``src`` (an f16 GGUF) at ``dst``: llama-quantize on PATH, else the binding.
    Returns (the quantizer used, llama.cpp's fallback note or None)."""
    binary = shutil.which("llama-quantize")
    if binary:
        result = subprocess.run([binary, str(src), str(dst), quant.upper()], capture_output=True, text=True)
        if result.returncode != 0 or not dst.is_file():
            lines = [s.strip() for s in (result.stderr or result.stdout).splitlines() if s.strip()]
            raise ExportError(f"llama-quantize failed: {lines[-1] if lines else result.returncode}")
        return binary, _fallback_note(result.stderr + result.stdout)
    llama_cpp = _need_binding(f"--quant {quant}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, KQUANT_FTYPES[quant])
    params.nthread = os.cpu_count() or 1
    with _native_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        lines = [s.strip() for s in log.text.splitlines() if s.strip()]
        raise ExportError(
            f"llama.cpp could not quantize {src.name} to {quant} (llama_model_quantize returned {rc}"
            + (f": {lines[-1]})" if lines else ")")
        )
    return f"llama-cpp-python {llama_cpp_python_version()} llama_model_quantize", _fallback_note(log.text)


# ---- reading a GGUF back -----------------------------------------------------------------------


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The few fields the export checks and records, read with the gguf package."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    wanted = {
        "general.architecture",
        "general.file_type",
        "tokenizer.chat_template",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.add_bos_token",
        "adapter.type",
        "adapter.lora.alpha",
    }
    meta: dict[str, Any] = {}
    for name in wanted:
        field = reader.get_field(name)
        if field is not None:
            value = field.contents()
            meta[name] = value.decode("utf-8") if isinstance(value, bytes) else value
    meta["tensors"] = len(reader.tensors)
    return meta


# ---- verification ------------------------------------------------------------------------------


def check_template(meta: dict, template, tokenizer, conversations: list[Conversation]) -> dict:
    """The GGUF's chat template is the export's, and rendered (as llama-cpp-python renders it) gives
    lorakit's prompt ids; its EOS is the tokenizer's."""
    from .generate import prompt_ids_for

    want = export_chat_template(template, tokenizer)
    got = meta.get("tokenizer.chat_template")
    if got != want:
        raise VerificationFailed(
            "verification failed: the GGUF's tokenizer.chat_template is not the training template"
        )
    if meta.get("tokenizer.ggml.eos_token_id") != tokenizer.eos_token_id:
        raise VerificationFailed(
            f"verification failed: the GGUF's EOS id {meta.get('tokenizer.ggml.eos_token_id')} is not the tokenizer's "
            f"{tokenizer.eos_token_id}"
        )
    render = _renderer(got, tokenizer)
    identical, problems = 0, []
    for conv in conversations:
        ids = prompt_ids_for(template, tokenizer, conv.instruction, conv.input, list(conv.history), conv.system)
        try:
            text = render(messages_for(template, conv))
        except Exception as e:  # a template error is a failed check
            problems.append(f"{conv.instruction[:40]!r}: {type(e).__name__}: {e}")
            continue
        rendered = tokenizer(text, add_special_tokens=False)["input_ids"]
        if list(rendered) == list(ids):
            identical += 1
        else:
            problems.append(f"{conv.instruction[:40]!r}: {len(rendered)} ids vs lorakit's {len(ids)}")
    if problems:
        raise VerificationFailed(
            f"verification failed: the GGUF's chat template does not render lorakit's prompt for {len(problems)} of "
            f"{len(conversations)} conversations (first: {problems[0]})",
            {"template_checked": len(conversations), "template_identical": identical},
        )
    return {"template_checked": len(conversations), "template_identical": identical}


def _renderer(jinja: str, tokenizer):
    """How llama-cpp-python applies a GGUF's chat template (Jinja2ChatFormatter), else a sandbox."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    try:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fmt = Jinja2ChatFormatter(template=jinja, eos_token=eos, bos_token=bos, add_generation_prompt=True)
        return lambda messages: fmt(messages=messages).prompt
    except ImportError:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        tpl = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).from_string(jinja)
        return lambda messages: tpl.render(
            messages=messages,
            bos_token=bos,
            eos_token=eos,
            add_generation_prompt=True,
            raise_exception=raise_exception,
        )


def llama_cpp_answers(
    model_path: Path,
    prompt_ids: list[list[int]],
    stop_ids: list[int],
    stop_strings: list[str],
    new_tokens: int,
    lora_path: Path | None = None,
) -> tuple[list[str], list[list[int]], float]:
    """llama.cpp's greedy answers from lorakit's prompt ids: (answers, token ids, tokens/s)."""
    llama_cpp = _need_binding("GGUF verification")
    from .stops import cut_at_stop

    n_ctx = max(256, max(len(p) for p in prompt_ids) + new_tokens + 8)
    kwargs: dict[str, Any] = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, verbose=False, seed=0, **llama_threads(), **kwargs)
    answers, streams, generated, seconds = [], [], 0, 0.0
    try:
        for ids in prompt_ids:
            llm.reset()
            new: list[int] = []
            start = time.perf_counter()
            for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                if tok in stop_ids:
                    break
                new.append(tok)
                if len(new) >= new_tokens:
                    break
                if stop_strings and cut_at_stop(_text(llm, new), stop_strings)[1]:
                    break
            seconds += time.perf_counter() - start
            generated += len(new)
            streams.append(new)
            answers.append(cut_at_stop(_text(llm, new), stop_strings)[0].strip())
    finally:
        llm.close() if hasattr(llm, "close") else None
        del llm
    return answers, streams, generated / seconds if seconds > 0 else 0.0


def llama_cpp_logits(
    model_path: Path, prompt_ids: list[list[int]], answers: list[list[int]], lora_path: Path | None = None
) -> list:
    """llama.cpp's next-token logits at each of lorakit's answer positions when it reads lorakit's
    prompt and answer (teacher forcing): one float32 array [len(answer), n_vocab] per prompt."""
    import numpy as np

    llama_cpp = _need_binding("GGUF verification")
    n_ctx = max(256, max(len(p) + len(a) for p, a in zip(prompt_ids, answers)) + 8)
    kwargs: dict[str, Any] = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(
        model_path=str(model_path), n_ctx=n_ctx, verbose=False, seed=0, logits_all=True, **llama_threads(), **kwargs
    )
    found = []
    try:
        for prompt, answer in zip(prompt_ids, answers):
            if not answer:
                found.append(np.zeros((0, llm.n_vocab()), dtype=np.float32))
                continue
            llm.reset()
            llm.eval(prompt + answer[:-1])
            # the logits at position i predict token i + 1
            found.append(np.array(llm.scores[len(prompt) - 1 : len(prompt) - 1 + len(answer)], dtype=np.float32))
    finally:
        llm.close() if hasattr(llm, "close") else None
        del llm
    return found


def _text(llm, ids: list[int]) -> str:
    return llm.detokenize(ids).decode("utf-8", errors="replace")


def verify_gguf(
    model_path: Path, reference: Reference, quant: str, lora_path: Path | None = None, min_top1: float | None = None
) -> dict:
    """A GGUF (or base GGUF + GGUF LoRA) against lorakit's reference: its chat template and EOS, then
    llama.cpp's greedy answers and teacher-forced logits; gated as ``quant`` (verify.THRESHOLDS)."""
    _need_binding("GGUF verification")
    template, tokenizer = reference.template, reference.tokenizer
    meta = gguf_metadata(model_path)
    figures = check_template(meta, template, tokenizer, CHECK_CONVERSATIONS + reference.vset.prompts)
    stops = template.stops(tokenizer)
    answers, _, tps = llama_cpp_answers(
        model_path,
        reference.prompt_ids,
        stops.eos_ids(tokenizer),
        list(stops.strings),
        reference.new_tokens,
        lora_path,
    )
    logits = llama_cpp_logits(model_path, reference.prompt_ids, reference.answer_ids, lora_path)
    figures.update(compare(reference, answers, logits, tps))
    figures["runtime"] = f"llama.cpp (llama-cpp-python {llama_cpp_python_version()}), {quant}"
    return gate(figures, quant, min_top1)


# ---- export ------------------------------------------------------------------------------------


def _stem(adapter_dir: Path) -> str:
    folder = adapter_dir.resolve()
    name = f"{folder.parent.name}-{folder.name}" if folder.name.startswith("checkpoint-") else folder.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "model"


def _check_out(out: Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"--out: {out} exists and is not empty; choose another folder or pass --force")
    return out


def export_gguf(
    adapter: str | Path,
    out: Path,
    *,
    base: str | None = None,
    quant: str = "q8_0",
    verify: bool = True,
    llama_cpp_dir: str | None = None,
    force: bool = False,
    vset: VerifySet | None = None,
    reference: Reference | None = None,
    new_tokens: int = VERIFY_NEW_TOKENS,
    min_top1: float | None = None,
    trust_remote_code: bool = False,
    qlora: dict | None = None,
) -> dict:
    """The adapter merged into its base as one GGUF file (``quant``) in ``out``; returns the record."""
    from .adapters import check_adapter_dir

    quant = quant.lower()
    if quant not in QUANTS:
        raise ExportError(f"--quant: '{quant}' is not one of {', '.join(QUANTS)}")
    adapter_dir = check_adapter_dir(adapter)
    check_portability(adapter_dir, "gguf", base)
    out = _check_out(out, force)
    if verify or (quant in KQUANT_FTYPES and not shutil.which("llama-quantize")):
        _need_binding("--to gguf")
    tools = find_llama_cpp(llama_cpp_dir)
    failure = None
    with staged_folder(out, "exporting") as staging:
        hf_dir = staging / ".merged-hf"
        hf = export_hf(
            adapter_dir,
            hf_dir,
            base=base,
            dtype="fp32",
            force=True,
            verify=False,
            trust_remote_code=trust_remote_code,
            qlora=qlora,
        )
        gguf_file = staging / f"{_stem(adapter_dir)}-{quant}{GGUF_SUFFIX}"
        started = time.perf_counter()
        if quant in CONVERTER_TYPES:
            run_script(tools, "convert_hf_to_gguf.py", [str(hf_dir), "--outfile", str(gguf_file), "--outtype", quant])
            quantizer = fallback = None
        else:
            f16 = staging / f".{gguf_file.stem}.f16{GGUF_SUFFIX}"
            run_script(tools, "convert_hf_to_gguf.py", [str(hf_dir), "--outfile", str(f16), "--outtype", "f16"])
            quantizer, fallback = quantize(f16, gguf_file, quant)
            f16_bytes = f16.stat().st_size
            f16.unlink()
        shutil.rmtree(hf_dir)
        record: dict[str, Any] = {
            "format": "gguf",
            "quant": quant,
            "gguf_file": gguf_file.name,
            "gguf_bytes": gguf_file.stat().st_size,
            "convert_seconds": round(time.perf_counter() - started, 1),
            "converter": f"llama.cpp convert_hf_to_gguf.py from {tools.source}",
            "quantizer": quantizer,
            "template": hf["template"],
            "template_kind": hf["template_kind"],
            "stops": {**hf["stops"], "eos_token_id": hf["generation_config"]["eos_token_id"]},
            "adapter": hf["adapter"],
            "base_model": hf["base_model"],
        }
        if qlora:
            record["qlora_base"] = qlora
        if quantizer:
            record["f16_bytes"] = f16_bytes
            record["quantizer_fallback"] = fallback
        meta = gguf_metadata(gguf_file)
        record["gguf_metadata"] = {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}
        if verify:
            reference = reference_for(
                reference,
                adapter_dir,
                hf["base_model"],
                vset,
                new_tokens,
                "fp32",
                trust_remote_code,
                qlora_base_weights(qlora),
            )
            try:
                record["verification"] = verify_gguf(gguf_file, reference, quant, min_top1=min_top1)
            except VerificationFailed as e:
                failure = e
                gguf_file = gguf_file.rename(gguf_file.with_name(unverified_name(gguf_file.name)))
                record["gguf_file"] = gguf_file.name
        finish_record(staging, record, verify, failure, [gguf_file])
    return placed(record, out, failure)


def _base_folder_with_template(base_path: Path, folder: Path, tokenizer, template) -> None:
    """A view of the base folder (weights linked, not copied) whose tokenizer carries the training template."""
    folder.mkdir(parents=True)
    for item in base_path.iterdir():
        if item.is_file() and (
            item.suffix in (".safetensors", ".bin")
            or item.name in ("config.json", "generation_config.json")
            or item.name.endswith(".index.json")
        ):
            os.symlink(item.resolve(), folder / item.name)
    tokenizer.save_pretrained(str(folder))


def export_gguf_lora(
    adapter: str | Path,
    out: Path,
    *,
    base: str | None = None,
    verify: bool = True,
    llama_cpp_dir: str | None = None,
    force: bool = False,
    vset: VerifySet | None = None,
    reference: Reference | None = None,
    new_tokens: int = VERIFY_NEW_TOKENS,
    min_top1: float | None = None,
    trust_remote_code: bool = False,
    qlora: dict | None = None,
) -> dict:
    """The adapter as a GGUF LoRA plus an f16 GGUF of its base (with the training template) in
    ``out``; returns the record (``lora_file``, ``base_gguf_file``)."""
    from ..data.templates import resolve_template
    from ..models.loading import load_tokenizer, resolve_model_path
    from ..models.registry import DEFAULT_BASE_MODEL
    from ..runfolder import ADAPTER_WEIGHTS
    from .adapters import check_adapter_dir

    adapter_dir = check_adapter_dir(adapter)
    check_portability(adapter_dir, "gguf-lora", base)  # int8, modules_to_save, embeddings, a foreign --base
    config = read_adapter_config(adapter_dir) or {}
    if config.get("use_dora"):
        raise ExportError(
            "--to gguf-lora: this is a DoRA adapter, which llama.cpp cannot apply; merge it with --to gguf"
        )
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ExportError(f"--to gguf-lora needs the float adapter weights ({ADAPTER_WEIGHTS}) in {adapter_dir}")
    out = _check_out(out, force)
    if verify:
        _need_binding("--to gguf-lora")
    tools = find_llama_cpp(llama_cpp_dir)
    base = base or recorded_base_model(adapter_dir) or DEFAULT_BASE_MODEL
    base_path = Path(resolve_model_path(base))
    tokenizer = load_tokenizer(base_path, trust_remote_code=trust_remote_code)
    template = resolve_template(adapter=adapter_dir, tokenizer=tokenizer)
    tokenizer.chat_template = export_chat_template(template, tokenizer)
    stops = template.stops(tokenizer)
    stem = _stem(adapter_dir)
    failure = None
    with staged_folder(out, "exporting") as staging:
        base_view = staging / ".base-hf"
        _base_folder_with_template(base_path, base_view, tokenizer, template)
        base_file = staging / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', base_path.name)}-f16{GGUF_SUFFIX}"
        lora_file = staging / f"{stem}-lora-f16{GGUF_SUFFIX}"
        started = time.perf_counter()
        run_script(tools, "convert_hf_to_gguf.py", [str(base_view), "--outfile", str(base_file), "--outtype", "f16"])
        # llama.cpp applies alpha / rank with ONE alpha: rsLoRA and rank/alpha patterns are folded into lora_B
        # (the folder keeps the adapter's name: the converter names the GGUF LoRA after it)
        lora_src, folding = fold_for_llama_cpp(adapter_dir, staging / ".adapter-folded" / adapter_dir.resolve().name)
        lora_args = ["--base", str(base_view), "--outfile", str(lora_file), "--outtype", "f16", str(lora_src)]
        run_script(tools, "convert_lora_to_gguf.py", lora_args)
        shutil.rmtree(base_view)
        if lora_src != adapter_dir:
            shutil.rmtree(lora_src.parent)
        record: dict[str, Any] = {
            "format": "gguf-lora",
            "quant": "f16",
            "lora_file": lora_file.name,
            "base_gguf_file": base_file.name,
            "lora_bytes": lora_file.stat().st_size,
            "base_gguf_bytes": base_file.stat().st_size,
            "convert_seconds": round(time.perf_counter() - started, 1),
            "converter": f"llama.cpp convert_lora_to_gguf.py + convert_hf_to_gguf.py from {tools.source}",
            "template": template.name,
            "template_kind": template.kind,
            "stops": {
                "strings": list(stops.strings),
                "token_ids": list(stops.token_ids),
                "eos_token_id": stops.eos_ids(tokenizer),
            },
            "adapter": str(adapter_dir.resolve()),
            "base_model": base,
            "lora_metadata": gguf_metadata(lora_file),
            "scale_folding": folding,
        }
        if qlora:
            record["qlora_base"] = qlora
        if verify:
            reference = reference_for(reference, adapter_dir, base, vset, new_tokens, "fp32", trust_remote_code)
            try:
                record["verification"] = verify_gguf(
                    base_file, reference, "f16", lora_path=lora_file, min_top1=min_top1
                )
            except VerificationFailed as e:
                failure = e
                lora_file = lora_file.rename(lora_file.with_name(unverified_name(lora_file.name)))
                record["lora_file"] = lora_file.name
        finish_record(staging, record, verify, failure, [lora_file, base_file])
    return placed(record, out, failure)
