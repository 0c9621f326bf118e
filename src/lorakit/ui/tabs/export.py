"""The Export tab: `lorakit export` of an adapter of the workdir (hf, gguf or ollama), run as a
subprocess (the page stays light and answering), into WORKDIR/exports/NAME; the command line, the
command's summary and the verification figures of the export record (export.json); an export that
failed its verification shows its figures and where it was kept, marked unverified."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import gradio as gr

from ...errors import LorakitError
from ...runfolder import read_export_record
from ..workdir import Workdir, safe_stem
from .common import Shared, error_text

FORMATS = [
    ("hf: a merged transformers folder", "hf"),
    ("gguf: llama.cpp", "gguf"),
    ("ollama: GGUF + Modelfile", "ollama"),
]
QUANTS = ["q8_0", "q4_k_m", "f16", "bf16", "f32"]
TIMEOUT_S = 3600


def export_argv(
    workdir: Workdir,
    adapter_key: str,
    fmt: str,
    quant: str = "q8_0",
    lora_only: bool = False,
    name: str = "",
    base: str = "",
    verify: bool = True,
    force: bool = False,
) -> tuple[list[str], Path]:
    """The `lorakit export` arguments (after the program) and the folder it writes."""
    folder = workdir.resolve_adapter(adapter_key)
    if fmt not in {v for _, v in FORMATS}:
        raise LorakitError(f"format: choose one of {', '.join(v for _, v in FORMATS)}")
    if not (name or "").strip():
        name = f"{safe_stem(adapter_key.replace('/', '-'), 'adapter')}-{fmt}"
    out = workdir.path_for(workdir.exports_dir, name, "export name")
    args = ["export", "--adapter", str(folder), "--to", fmt, "--out", str(out)]
    if fmt != "hf" and not lora_only:
        args += ["--quant", quant]
    if lora_only:
        if fmt != "ollama":
            raise LorakitError("LoRA only: only for the ollama format (the base GGUF + a GGUF LoRA)")
        args.append("--lora-only")
    if (base or "").strip():
        args += ["--base", base.strip()]
    if not verify:
        args.append("--no-verify")
    if force:
        args.append("--force")
    return args, out


def run_export(workdir: Workdir, args: list[str]) -> str:
    """Run `lorakit export ARGS`; its summary (stdout), or a LorakitError with its error line."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *args],
        cwd=workdir.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if r.returncode != 0:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        raise LorakitError(errors[-1].removeprefix("error: ") if errors else (lines or ["no output"])[-1])
    return r.stdout.strip()


def build(shared: Shared) -> gr.Tab:
    workdir = shared.workdir

    with gr.Tab("Export", id="export", elem_id="tab-export") as tab:
        with gr.Row():
            exp_adapter = gr.Dropdown([], label="Adapter", elem_id="export-adapter", scale=3)
            exp_format = gr.Radio(FORMATS, value="hf", label="Format", elem_id="export-format", scale=3)
        with gr.Row():
            exp_quant = gr.Dropdown(QUANTS, value="q8_0", label="GGUF quantization", elem_id="export-quant", scale=1)
            exp_lora = gr.Checkbox(False, label="LoRA only (ollama: base GGUF + ADAPTER)", elem_id="export-lora-only")
            exp_name = gr.Textbox(label="Export name (default: ADAPTER-FORMAT)", elem_id="export-name", scale=2)
            exp_base = gr.Textbox(label="Base model (default: the adapter's)", elem_id="export-base", scale=2)
        with gr.Row():
            exp_verify = gr.Checkbox(True, label="Verify against lorakit's answers", elem_id="export-verify")
            exp_force = gr.Checkbox(False, label="Replace an existing export", elem_id="export-force")
        exp_btn = gr.Button("Export", variant="primary", elem_id="export-run")
        exp_command = gr.Markdown(elem_id="export-command")
        exp_status = gr.Markdown(elem_id="export-status")
        exp_figures = gr.Code(label="Verification (export.json)", language="json", elem_id="export-figures")

    shared.refreshes(exp_adapter, lambda: gr.update(choices=workdir.adapter_choices()))

    def on_export(key, fmt, quant, lora_only, name, base, verify, force):
        try:
            args, out = export_argv(workdir, key, fmt, quant, bool(lora_only), name, base, bool(verify), bool(force))
        except Exception as e:
            yield {exp_status: error_text(e), exp_command: "", exp_figures: ""}
            return
        command = shlex.join(["lorakit", *args])
        yield {exp_command: f"`{command}`", exp_status: "exporting (merging and verifying can take a while)..."}
        try:
            summary = run_export(workdir, args)
        except Exception as e:
            record = read_export_record(out) or {}
            failed = record.get("verified") is False and record.get("verification")  # kept, marked unverified
            figures = json.dumps(record["verification"], indent=2, ensure_ascii=False) if failed else ""
            yield {exp_status: error_text(e), exp_figures: figures}
            return
        record = read_export_record(out) or {}
        figures = record.get("verification")
        yield {
            exp_status: f"Exported to `{out}`.\n\n```\n{summary}\n```",
            exp_figures: json.dumps(figures, indent=2, ensure_ascii=False) if figures else "not verified",
        }

    exp_btn.click(
        on_export,
        [exp_adapter, exp_format, exp_quant, exp_lora, exp_name, exp_base, exp_verify, exp_force],
        [exp_command, exp_status, exp_figures],
    )
    return tab
