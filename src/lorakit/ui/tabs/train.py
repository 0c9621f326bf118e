"""The Train tab: base model, dataset (with an upload and a preview of one record), the
settings form (each field labelled with its TrainConfig key), Start / Stop, and the run's
progress and loss chart, read every second from its train_log.jsonl."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
import pandas as pd

from ...config import SCHEDULERS
from ...data.templates import builtin_template_names
from ...errors import LorakitError
from ...models.registry import DEFAULT_BASE_MODEL
from ..preview import TRAINED, preview_record, target_module_choices
from ..training import (
    FORM_KEYS,
    RunStatus,
    form_defaults,
    prepare_run,
    values_from_config,
)
from ..workdir import DATA_SUFFIXES, DEMO_TRAIN, upload_limit
from .common import Shared, error_text

FIELD_KEYS = [k for k in FORM_KEYS if k != "lora_target_modules"]  # one component each
DEMO_STEPS = 60  # as `lorakit demo`

CSS = """
#train-progress progress { width: 100%; height: 14px; }
#train-progress .line { font-family: ui-monospace, monospace; font-size: 15px; margin-top: 4px; }
"""


def demo_settings(base_model: str) -> dict:
    """The settings `lorakit demo` trains with (lorakit/demo.py), filled in when the demo data is
    chosen; plus a loss point per step and checkpoints Stop can keep."""
    from ...demo import demo_config

    recipe = demo_config(Path("lorakit-demo"), DEMO_STEPS, base_model).model_dump()
    return {
        **values_from_config(recipe),
        "logging_steps": 1,
        "save_steps": 20,
        "eval_steps": 20,
        "save_total_limit": 2,
    }


def progress_html(st: RunStatus | None) -> str:
    if st is None:
        return '<div class="line">No run yet: choose data and press Start.</div>'
    total = st.total or 0
    value = total if st.state == "done" else (st.step or 0)
    bar = f'<progress value="{value}" max="{total}"></progress>' if total else "<progress></progress>"
    line = st.progress_line() if st.state == "starting" else f"{st.name}: {st.state} · " + st.progress_line()
    return f'<div data-state="{st.state}">{bar}<div class="line">{html.escape(line)}</div></div>'


def loss_frame(points: list[dict]) -> pd.DataFrame | None:
    # None, not an empty frame, until there are points: gradio 6's LinePlot draws no line at all
    # after starting from an empty frame.
    if not points:
        return None
    frame = pd.DataFrame(points, columns=["step", "loss", "series"])
    return frame.astype({"step": "int64", "loss": "float64", "series": "str"})


def build(shared: Shared) -> gr.Tab:
    workdir, runs = shared.workdir, shared.runs
    defaults = form_defaults()

    # ---- layout ---------------------------------------------------------------------------------
    with gr.Tab("Train", id="train", elem_id="tab-train") as tab:
        with gr.Row():
            with gr.Column(scale=1):
                fields = {}
                fields["base_model"] = gr.Dropdown(
                    workdir.base_model_choices(),
                    value=DEFAULT_BASE_MODEL,
                    allow_custom_value=True,
                    label="Base model",
                    info="base_model: an alias, a model folder (WORKDIR/models/...), a .gguf file",
                    elem_id="train-base",
                )
                dataset = gr.Dropdown(
                    workdir.dataset_choices(),
                    value=None,
                    label="Dataset",
                    info="files in WORKDIR/data, or the built-in demo data",
                    elem_id="train-dataset",
                )
                upload = gr.File(
                    label="Upload a dataset (.json, .jsonl, .csv, .parquet: Alpaca, Dolly, "
                    f"messages, ShareGPT or text records; at most {upload_limit(workdir)})",
                    file_types=list(DATA_SUFFIXES),
                    elem_id="train-upload",
                    height=120,
                )
                upload_msg = gr.Markdown(elem_id="train-upload-msg")
                with gr.Row():
                    copy_from = gr.Dropdown(
                        [("-", "")],
                        value="",
                        label="Copy parameters from",
                        info="fill the form from an adapter's config",
                        elem_id="train-copy-from",
                    )
                    resume = gr.Checkbox(
                        False,
                        label="Resume from its last checkpoint",
                        info="continue that run in its own folder",
                        elem_id="train-resume",
                    )
                name = gr.Textbox(
                    label="Adapter name",
                    placeholder="automatic: lora-<data>-<date>",
                    info="the run's folder: WORKDIR/adapters/<name>",
                    elem_id="train-name",
                )
            with gr.Column(scale=1):
                with gr.Row():
                    preview_index = gr.Number(
                        1, precision=0, minimum=1, label="Preview record", elem_id="preview-index", scale=1
                    )
                preview = gr.HighlightedText(
                    label="As the model sees it (the trained part highlighted)",
                    color_map={TRAINED: "green"},
                    show_legend=True,
                    combine_adjacent=True,
                    elem_id="train-preview",
                )
                preview_info = gr.Markdown(elem_id="preview-info")
        with gr.Accordion("LoRA", open=True):
            with gr.Row():
                fields["lora_r"] = gr.Number(defaults["lora_r"], precision=0, label="Rank", info="lora_r")
                fields["lora_alpha"] = gr.Number(
                    defaults["lora_alpha"], label="Alpha", info="lora_alpha (scale = alpha / rank)"
                )
                fields["lora_dropout"] = gr.Number(
                    defaults["lora_dropout"], step=0.01, label="Dropout", info="lora_dropout"
                )
            with gr.Row():
                modules = target_module_choices(DEFAULT_BASE_MODEL)
                targets = gr.CheckboxGroup(
                    modules,
                    value=[m for m in defaults["lora_target_modules"] if m in modules],
                    label="Target modules",
                    info="lora_target_modules",
                    elem_id="train-targets",
                    scale=3,
                )
                all_linear = gr.Checkbox(
                    False, label="all-linear", info="every linear layer", elem_id="train-all-linear", scale=1
                )
        with gr.Accordion("Training", open=True):
            with gr.Row():
                fields["learning_rate"] = gr.Number(
                    defaults["learning_rate"], step=1e-5, label="Learning rate", info="learning_rate"
                )
                fields["num_epochs"] = gr.Number(
                    defaults["num_epochs"], label="Epochs", info="num_epochs (used when max steps is 0)"
                )
                fields["max_steps"] = gr.Number(
                    0, precision=0, label="Max steps", info="max_steps: 0 = train by epochs", elem_id="train-max-steps"
                )
                fields["lr_scheduler_type"] = gr.Dropdown(
                    list(SCHEDULERS), value=defaults["lr_scheduler_type"], label="Scheduler", info="lr_scheduler_type"
                )
            with gr.Row():
                fields["batch_size"] = gr.Number(
                    defaults["batch_size"],
                    precision=0,
                    label="Batch size",
                    info="batch_size: examples per optimizer step",
                    elem_id="train-batch",
                )
                fields["micro_batch_size"] = gr.Number(
                    defaults["micro_batch_size"],
                    precision=0,
                    label="Micro-batch size",
                    info="micro_batch_size: per forward pass",
                    elem_id="train-micro-batch",
                )
                fields["cutoff_len"] = gr.Number(
                    defaults["cutoff_len"],
                    precision=0,
                    label="Cutoff length",
                    info="cutoff_len: most tokens per example",
                )
                fields["prompt_template_name"] = gr.Dropdown(
                    builtin_template_names(),
                    value=defaults["prompt_template_name"],
                    allow_custom_value=True,
                    label="Template",
                    info="prompt_template_name (or a template file's path)",
                )
        with gr.Accordion("More settings", open=False):
            with gr.Row():
                fields["warmup_steps"] = gr.Number(
                    defaults["warmup_steps"], precision=0, label="Warm-up steps", info="warmup_steps"
                )
                fields["weight_decay"] = gr.Number(defaults["weight_decay"], label="Weight decay", info="weight_decay")
                fields["val_set_size"] = gr.Number(
                    defaults["val_set_size"],
                    label="Validation examples",
                    info="val_set_size: a count or a fraction; 0 = none",
                )
                fields["seed"] = gr.Number(defaults["seed"], precision=0, label="Seed", info="seed")
            with gr.Row():
                fields["logging_steps"] = gr.Number(
                    defaults["logging_steps"],
                    precision=0,
                    label="Log every N steps",
                    info="logging_steps",
                    elem_id="train-logging-steps",
                )
                fields["eval_steps"] = gr.Number(
                    defaults["eval_steps"],
                    precision=0,
                    label="Evaluate every N steps",
                    info="eval_steps (with validation examples)",
                    elem_id="train-eval-steps",
                )
                fields["save_steps"] = gr.Number(
                    defaults["save_steps"],
                    precision=0,
                    label="Checkpoint every N steps",
                    info="save_steps",
                    elem_id="train-save-steps",
                )
                fields["save_total_limit"] = gr.Number(
                    defaults["save_total_limit"], precision=0, label="Checkpoints kept", info="save_total_limit"
                )
                fields["precision"] = gr.Dropdown(
                    ["auto", "fp32", "bf16", "fp16"], value=defaults["precision"], label="Precision", info="precision"
                )
            with gr.Row():
                fields["train_on_inputs"] = gr.Checkbox(
                    defaults["train_on_inputs"], label="Train on the prompt too", info="train_on_inputs"
                )
                targets_regex = gr.Textbox(
                    label="Target modules as a regular expression",
                    info="over full module names; overrides the boxes above",
                    placeholder=r".*layers\.(0|1)\..*_proj",
                )
        with gr.Row():
            start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
            stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="train-stop")
        # Start's own answer (a refusal stays in view while the run of another session goes on)
        start_msg = gr.Markdown(elem_id="train-start-msg")
        progress = gr.HTML(progress_html(None), elem_id="train-progress")
        train_status = gr.Markdown(elem_id="train-status")
        train_command = gr.Markdown(elem_id="train-command")
        loss_chart = gr.LinePlot(
            None, x="step", y="loss", color="series", title="Loss", height=280, elem_id="train-loss-chart"
        )
        timer = gr.Timer(1.0)
        seen = gr.State({})

    shared.add("train", base_model=fields["base_model"])
    shared.refreshes(
        copy_from,
        lambda: gr.update(choices=[("-", "")] + [(a.name, a.name) for a in workdir.adapters() if a.settings()]),
    )
    shared.refreshes(dataset, lambda: gr.update(choices=workdir.dataset_choices()))

    field_inputs = [fields[k] for k in FIELD_KEYS]
    target_inputs = [targets, all_linear, targets_regex]

    def form_values(args) -> dict:
        values = dict(zip(FIELD_KEYS, args[: len(FIELD_KEYS)]))
        boxes, every_linear, regex = args[len(FIELD_KEYS) :]
        values["lora_target_modules"] = (
            "all-linear" if every_linear else (regex.strip() if (regex or "").strip() else list(boxes or []))
        )
        return values

    def fill_form(values: dict) -> dict:
        """Updates setting every form field from config values."""
        out = {
            fields[k]: (0 if k == "max_steps" and (values.get(k) or 0) < 0 else values[k])
            for k in FIELD_KEYS
            if k in values
        }
        t = values.get("lora_target_modules")
        modules = target_module_choices(values.get("base_model") or DEFAULT_BASE_MODEL)
        if t == "all-linear":
            out.update({all_linear: True, targets_regex: ""})
        elif isinstance(t, str):
            out.update({all_linear: False, targets_regex: t})
        elif isinstance(t, list):  # names the model lacks stay visible (training will say so)
            out.update(
                {
                    all_linear: False,
                    targets_regex: "",
                    targets: gr.update(choices=modules + [m for m in t if m not in modules], value=t),
                }
            )
        return out

    # ---- data, preview, form --------------------------------------------------------------------
    def on_upload(path):
        if not path:
            return {upload_msg: ""}
        try:
            saved = workdir.save_upload(path)
        except Exception as e:
            return {upload_msg: f"**Upload refused.** {error_text(e)}", upload: None}
        return {
            upload_msg: f"Saved as `{saved.relative_to(workdir.root)}`: checked, ready to train on.",
            dataset: gr.update(choices=workdir.dataset_choices(), value=str(saved)),
            upload: None,
        }

    upload.upload(on_upload, upload, [upload_msg, dataset, upload])

    def on_preview(data_value, template, base, index, cutoff, train_on_inputs):
        if not data_value:
            return {preview: None, preview_info: "Choose a dataset to see a record as the model will."}
        try:
            path = workdir.resolve_dataset(data_value)
            segments, line = preview_record(
                path,
                template or "alpaca",
                base or DEFAULT_BASE_MODEL,
                int(index or 1) - 1,
                int(cutoff or 256),
                bool(train_on_inputs),
            )
        except Exception as e:
            return {preview: None, preview_info: error_text(e)}
        return {preview: segments, preview_info: line}

    preview_inputs = [
        dataset,
        fields["prompt_template_name"],
        fields["base_model"],
        preview_index,
        fields["cutoff_len"],
        fields["train_on_inputs"],
    ]
    for trigger in (fields["prompt_template_name"], preview_index, fields["cutoff_len"], fields["train_on_inputs"]):
        trigger.change(on_preview, preview_inputs, [preview, preview_info], show_progress="hidden")
    dataset.change(on_preview, preview_inputs, [preview, preview_info], show_progress="hidden")

    def on_dataset_chosen(data_value, base):
        """The user picked a dataset (not a programmatic change: uploads and 'copy parameters
        from' set it too). The demo data brings the settings `lorakit demo` uses."""
        if data_value != DEMO_TRAIN:
            return {upload_msg: ""}
        return {
            **fill_form(demo_settings(base or DEFAULT_BASE_MODEL)),
            upload_msg: (
                "Demo data: an assistant named *Marlowe*, made by *Juniper Labs*, a persona the "
                "base model does not have. The demo's settings are filled in (as `lorakit demo`): "
                f"{DEMO_STEPS} steps of batch 8 at learning rate 1e-3 on the attention layers; "
                "change them freely, then Start."
            ),
        }

    dataset.input(on_dataset_chosen, [dataset, fields["base_model"]], [upload_msg, *field_inputs, *target_inputs])

    def on_base(base, current, *preview_args):
        modules = target_module_choices(base or DEFAULT_BASE_MODEL)
        out = on_preview(*preview_args)
        out[targets] = gr.update(choices=modules, value=[m for m in (current or []) if m in modules])
        return out

    fields["base_model"].change(
        on_base, [fields["base_model"], targets, *preview_inputs], [targets, preview, preview_info]
    )

    def on_copy_from(run_name):
        if not run_name:
            return {resume: gr.update(value=False)}
        known = {a.name: a for a in workdir.adapters()}
        if run_name not in known:  # a folder of adapters/, never a path
            return {train_status: f"error: copy parameters from: {run_name!r} is not a run in {workdir.adapters_dir}"}
        info = known[run_name]
        config = info.settings()
        out = fill_form(values_from_config(config))
        data_path = config.get("data_path")
        if data_path and Path(data_path).is_file():
            value = workdir.dataset_value(data_path)
            choices = workdir.dataset_choices()
            if value not in [v for _, v in choices]:  # a file outside WORKDIR/data (a CLI run)
                choices.append((str(data_path), value))
            out[dataset] = gr.update(choices=choices, value=value)
        out[resume] = gr.update(
            value=False,
            interactive=bool(info.checkpoints),
            info=(
                f"continue from {info.checkpoints[-1].name} in its own folder"
                if info.checkpoints
                else "it has no complete checkpoint"
            ),
        )
        return out

    copy_from.input(on_copy_from, copy_from, [*field_inputs, *target_inputs, dataset, resume, train_status])

    # ---- start, stop, progress ------------------------------------------------------------------
    def on_start(data_value, run_name, copied, resume_it, *args):
        def prepare():
            if resume_it and not copied:
                raise LorakitError("resume: pick the run under 'Copy parameters from' first")
            data_path = workdir.resolve_dataset(data_value)
            return prepare_run(
                workdir, form_values(args), data_path, name=copied if resume_it else run_name, resume=bool(resume_it)
            )

        try:  # under the process's lock: a run in progress is refused before anything is written
            run = runs.launch(prepare)
        except Exception as e:
            return {start_msg: f"**Not started.** {error_text(e)}"}
        return {
            start_msg: "",
            train_status: f"Started **{run.name}**: loading data and model...",
            resume: False,
            train_command: f"Repeat it from a terminal: `{run.command_line}`  \nOutput: `{run.log_path}`",
            progress: progress_html(run.status()),
            start_btn: gr.update(interactive=False),
            stop_btn: gr.update(interactive=True),
            loss_chart: loss_frame([]),
        }

    start_btn.click(
        on_start,
        [dataset, name, copy_from, resume, *field_inputs, *target_inputs],
        [start_msg, train_status, train_command, progress, start_btn, stop_btn, loss_chart, resume],
    )

    def on_stop():
        if runs.stop():
            return {
                train_status: "Stopping: the run ends at its next step; its complete checkpoints are kept.",
                stop_btn: gr.update(interactive=False),
            }
        return {train_status: "No run in progress."}

    stop_btn.click(on_stop, None, [train_status, stop_btn])

    def on_tick(last: dict, lists_version: int):
        run = runs.run
        if run is None:
            return gr.skip()
        st = run.status()
        out = {}
        if not (last.get("run") == run.name and last.get("state") == st.state and st.finished):
            out[progress] = progress_html(st)
        if last.get("run") != run.name or last.get("log_lines") != st.log_lines:
            out[loss_chart] = loss_frame(st.points)
        if last.get("run") != run.name or last.get("state") != st.state:
            if st.message or st.state == "training":
                out[train_status] = st.message or f"Training **{run.name}**..."
            if last.get("run") != run.name:
                out[train_command] = f"Repeat it from a terminal: `{run.command_line}`  \nOutput: `{run.log_path}`"
            out[start_btn] = gr.update(interactive=st.finished)
            out[stop_btn] = gr.update(interactive=st.state in ("starting", "training"))
            if st.finished:  # a new adapter (or checkpoint): every tab's lists are refreshed
                out[shared.lists_changed] = (lists_version or 0) + 1
                out[start_msg] = ""  # a refusal while it ran is over
        out[seen] = {"run": run.name, "state": st.state, "log_lines": st.log_lines}
        return out

    timer.tick(
        on_tick,
        [seen, shared.lists_changed],
        [
            progress,
            loss_chart,
            train_status,
            train_command,
            start_btn,
            stop_btn,
            seen,
            shared.lists_changed,
            start_msg,
        ],
        show_progress="hidden",
    )
    return tab
