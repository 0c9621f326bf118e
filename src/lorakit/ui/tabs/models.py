"""The Models tab: the base model Chat and Compare use, the adapters in the workdir (a table and
each one's manifest), apply / remove an adapter in the loaded model, and merge one into a
standalone model folder."""

from __future__ import annotations

import html

import gradio as gr

from ...errors import LorakitError
from ...models.registry import DEFAULT_BASE_MODEL
from ..evaluation import merge_into_workdir
from ..inference import manifest_text, speaker_for
from ..workdir import SUMMARY_HEADERS, Workdir
from .common import Shared, error_text


def adapters_table(workdir: Workdir) -> str:
    rows = [a.summary_row() for a in workdir.adapters()]
    if not rows:
        return "No adapter yet: train one on the Train tab (or copy adapter folders into WORKDIR/adapters)."

    def cell(v) -> str:
        return html.escape(str(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(SUMMARY_HEADERS) + " |", "|" + "---|" * len(SUMMARY_HEADERS)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def build(shared: Shared) -> gr.Tab:
    workdir, session = shared.workdir, shared.session
    train_base = shared["train.base_model"]

    with gr.Tab("Models", id="models", elem_id="tab-models") as tab:
        with gr.Row():
            models_base = gr.Dropdown(
                workdir.base_model_choices(),
                value=DEFAULT_BASE_MODEL,
                allow_custom_value=True,
                label="Base model",
                info="answers on Chat when no adapter is chosen",
                elem_id="models-base",
                scale=3,
            )
            load_base_btn = gr.Button("Load base model", elem_id="models-load-base", scale=1)
        gr.Markdown("### Adapters in the workdir")
        models_table = gr.Markdown(elem_id="models-table")
        with gr.Row():
            models_adapter = gr.Dropdown([], label="Adapter", elem_id="models-adapter", scale=3)
            apply_btn = gr.Button("Apply", elem_id="models-apply", scale=1)
            remove_btn = gr.Button("Remove", elem_id="models-remove", scale=1)
        with gr.Row():
            merge_name = gr.Textbox(
                label="Merged model name",
                placeholder="<adapter>-merged",
                info="written to WORKDIR/merged/<name>",
                scale=3,
            )
            merge_dtype = gr.Dropdown(["fp32", "bf16", "fp16"], value="fp32", label="dtype", scale=1)
            merge_btn = gr.Button("Merge and export", elem_id="models-merge", scale=1)
        models_status = gr.Markdown(session.status(), elem_id="models-status")
        manifest = gr.Code(language="json", label="Manifest", elem_id="models-manifest")

    shared.add("models", base=models_base)  # the base model Chat and Compare answer with
    shared.refreshes(models_adapter, lambda: gr.update(choices=workdir.adapter_choices()))
    shared.refreshes(models_table, lambda: adapters_table(workdir))
    shared.refreshes(models_status, session.status)

    def on_load_base(base):
        try:
            session.use_base(base or DEFAULT_BASE_MODEL)
        except Exception as e:
            return error_text(e)
        return session.status()

    load_base_btn.click(on_load_base, models_base, models_status)

    def on_models_adapter(key):
        if not key:
            return ""
        try:
            return manifest_text(workdir.resolve_adapter(key))
        except Exception as e:
            return error_text(e)

    models_adapter.change(on_models_adapter, models_adapter, manifest)

    def on_apply(key, base):
        try:
            speaker = speaker_for(workdir, key, base or DEFAULT_BASE_MODEL)
            if not key:
                raise LorakitError("apply: choose an adapter")
            session.prepare(speaker)
        except Exception as e:
            return error_text(e)
        return f"Applied {key}. " + session.status()

    apply_btn.click(on_apply, [models_adapter, models_base], models_status)

    def on_remove(key):
        try:
            session.remove(key)
        except Exception as e:
            return error_text(e)
        return f"Removed {key}. " + session.status()

    remove_btn.click(on_remove, models_adapter, models_status)

    def on_merge(key, merged_name, dtype):
        try:
            if not key:
                raise LorakitError("merge: choose an adapter")
            path, command = merge_into_workdir(workdir, key, merged_name, dtype)
        except Exception as e:
            return {models_status: error_text(e)}
        choices = workdir.base_model_choices()  # the merged folder is a base model now, here and on Train
        return {
            models_status: f"Merged into `{path}` (a standalone model folder; it is offered as a base "
            f"model now). Repeat from a terminal: `{command}`",
            models_base: gr.update(choices=choices),
            train_base: gr.update(choices=choices),
        }

    merge_btn.click(on_merge, [models_adapter, merge_name, merge_dtype], [models_status, models_base, train_base])
    return tab
