"""The Compare tab: one prompt, answered greedily by the base model and up to MAX_COMPARE
adapters side by side."""

from __future__ import annotations

import gradio as gr

from ...data.templates import builtin_template_names
from ...errors import LorakitError
from ...infer.generate import GenerationParams
from ...models.registry import DEFAULT_BASE_MODEL
from ..inference import speaker_for
from .common import Shared, error_text

MAX_COMPARE = 4  # adapters answering beside the base


def build(shared: Shared) -> gr.Tab:
    workdir, session = shared.workdir, shared.session
    models_base = shared["models.base"]

    with gr.Tab("Compare", id="compare", elem_id="tab-compare") as tab:
        compare_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="compare-prompt")
        with gr.Row():
            compare_adapters = gr.Dropdown(
                [],
                multiselect=True,
                max_choices=MAX_COMPARE,
                label="Adapters beside the base model",
                elem_id="compare-adapters",
                scale=3,
            )
            compare_template = gr.Dropdown(
                [("auto", "")] + builtin_template_names(),
                value="",
                label="Template",
                info="auto: the first adapter's",
                scale=1,
            )
            compare_max = gr.Slider(1, 512, value=96, step=1, label="Max new tokens", scale=1)
        compare_system = gr.Textbox(label="System prompt (optional)")
        compare_btn = gr.Button("Compare", variant="primary", elem_id="compare-run")
        with gr.Row():
            answers = [gr.Textbox(label="base model", lines=8, interactive=False, elem_id="compare-answer-0")]
            answers += [
                gr.Textbox(
                    label=f"adapter {i}", lines=8, interactive=False, visible=False, elem_id=f"compare-answer-{i}"
                )
                for i in range(1, MAX_COMPARE + 1)
            ]
        compare_status = gr.Markdown(elem_id="compare-status")

    shared.refreshes(compare_adapters, lambda: gr.update(choices=workdir.adapter_choices()))

    def on_compare(prompt, keys, template, max_new, system, base):
        hidden = {box: gr.update(visible=False, value="") for box in answers[1:]}
        try:
            prompt = (prompt or "").strip()
            if not prompt:
                raise LorakitError("compare: write a prompt")
            if not keys:
                raise LorakitError("compare: choose at least one adapter")
            adapters = [speaker_for(workdir, k, base or DEFAULT_BASE_MODEL) for k in keys]
            speakers = [speaker_for(workdir, None, adapters[0].base)] + adapters
            out = {**hidden, compare_status: "answering..."}
            for i, s in enumerate(speakers):
                out[answers[i]] = gr.update(visible=True, label=s.label, value="...")
            yield out
            params = GenerationParams(max_new_tokens=int(max_new))
            for i, answer, template_name in session.compare(speakers, prompt, system or "", params, template or None):
                done = i + 1 == len(speakers)
                yield {
                    answers[i]: gr.update(value=answer or "(empty answer)"),
                    compare_status: (
                        f"template {template_name}, greedy, at most {int(max_new)} new tokens"
                        if done
                        else f"answering... ({i + 1} of {len(speakers)} done)"
                    ),
                }
        except Exception as e:
            yield {compare_status: error_text(e)}

    compare_btn.click(
        on_compare,
        [compare_prompt, compare_adapters, compare_template, compare_max, compare_system, models_base],
        [*answers, compare_status],
    )
    return tab
