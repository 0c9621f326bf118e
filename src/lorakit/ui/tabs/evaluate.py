"""The Evaluate tab: `lorakit eval` on held-out data for the base and chosen adapters; the scores
as a table, the report's plots as images and its sections (efficiency, samples) as text."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from ...eval.metrics import METRICS
from ..evaluation import run_evaluation
from ..workdir import DATA_SUFFIXES, upload_limit
from .common import Shared, error_text


def build(shared: Shared) -> gr.Tab:
    workdir = shared.workdir

    with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate") as tab:
        with gr.Row():
            eval_data = gr.Dropdown(
                workdir.dataset_choices(heldout=True),
                multiselect=True,
                label="Eval data",
                elem_id="eval-data",
                scale=3,
            )
            eval_upload = gr.File(
                label=f"Upload eval data (.json, .jsonl, .csv, .parquet; at most {upload_limit(workdir)})",
                file_types=list(DATA_SUFFIXES),
                height=120,
                scale=2,
                elem_id="eval-upload",
            )
        with gr.Row():
            eval_adapters = gr.Dropdown([], multiselect=True, label="Adapters", elem_id="eval-adapters", scale=3)
            eval_base = gr.Dropdown(
                [("the first adapter's base", "")] + workdir.base_model_choices(),
                value="",
                allow_custom_value=True,
                label="Base model",
                scale=2,
            )
        with gr.Row():
            eval_metrics = gr.CheckboxGroup(list(METRICS), value=list(METRICS), label="Metrics", scale=3)
            eval_limit = gr.Number(20, precision=0, label="Examples per set (0 = all)", scale=1, elem_id="eval-limit")
            eval_max = gr.Number(64, precision=0, label="Max new tokens", scale=1, elem_id="eval-max-tokens")
        eval_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
        eval_status = gr.Markdown(elem_id="eval-status")
        eval_table = gr.Dataframe(interactive=False, label="Scores", elem_id="eval-table")
        eval_plots = gr.Gallery(label="Plots", columns=3, height=320, object_fit="contain", elem_id="eval-plots")
        eval_html = gr.File(label="report.html", elem_id="eval-html")
        eval_report = gr.Markdown(elem_id="eval-report")

    shared.refreshes(eval_adapters, lambda: gr.update(choices=workdir.adapter_choices()))
    shared.refreshes(eval_data, lambda: gr.update(choices=workdir.dataset_choices(heldout=True)))

    def on_eval_upload(path, chosen):
        if not path:
            return gr.skip()
        try:
            saved = workdir.save_upload(path)
        except Exception as e:
            return {eval_status: f"**Upload refused.** {error_text(e)}", eval_upload: None}
        return {
            eval_status: f"Saved as `{saved.relative_to(workdir.root)}`.",
            eval_upload: None,
            eval_data: gr.update(
                choices=workdir.dataset_choices(heldout=True), value=list(chosen or []) + [str(saved)]
            ),
        }

    eval_upload.upload(on_eval_upload, [eval_upload, eval_data], [eval_status, eval_data, eval_upload])

    def on_eval(data_values, keys, base, metrics, limit, max_new):
        try:
            yield {eval_status: "evaluating (answers are generated for every example; this can take a while)..."}
            result = run_evaluation(
                workdir,
                list(data_values or []),
                list(keys or []),
                base or None,
                list(metrics or []) or None,
                int(limit or 0) or None,
                int(max_new or 64),
            )
        except Exception as e:
            yield {eval_status: error_text(e)}
            return
        yield {
            eval_status: f"Report in `{result.out_dir}`. Repeat from a terminal: `{result.command}`",
            eval_table: pd.DataFrame(result.rows, columns=result.headers),
            eval_plots: [str(p) for p in result.plots],
            eval_html: str(result.html),
            eval_report: result.markdown,
        }

    eval_btn.click(
        on_eval,
        [eval_data, eval_adapters, eval_base, eval_metrics, eval_limit, eval_max],
        [eval_status, eval_table, eval_plots, eval_html, eval_report],
    )
    return tab
