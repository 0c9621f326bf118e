"""The Gradio page: five tabs wired to the plain functions of this package.

Every handler turns a LorakitError (a user's mistake) into a one-line message on the page; any
other exception is shown too, never swallowed. Components the browser test needs carry an
``elem_id`` (``train-start``, ``chat-input``, ...).
"""
from __future__ import annotations

import html
import os
import signal
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never calls home

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from ..config import SCHEDULERS  # noqa: E402
from ..data.templates import builtin_template_names  # noqa: E402
from ..errors import LorakitError  # noqa: E402
from ..eval.metrics import METRICS  # noqa: E402
from ..infer.generate import GenerationParams  # noqa: E402
from ..models.registry import DEFAULT_BASE_MODEL  # noqa: E402
from .evaluation import merge_into_workdir, run_evaluation  # noqa: E402
from .inference import ModelSession, manifest_text, speaker_for  # noqa: E402
from .preview import TRAINED, preview_record, target_module_choices  # noqa: E402
from .training import (FORM_KEYS, RunManager, RunStatus, form_defaults, prepare_run,  # noqa: E402
                       values_from_config)
from .workdir import DEMO_TRAIN, SUMMARY_HEADERS, Workdir  # noqa: E402

MAX_COMPARE = 4  # adapters answering beside the base on the Compare tab
FIELD_KEYS = [k for k in FORM_KEYS if k != "lora_target_modules"]
DEMO_STEPS = 60  # as `lorakit demo`


def demo_settings(base_model: str) -> dict:
    """The settings `lorakit demo` trains with (lorakit/demo.py), filled in when the demo data is
    chosen; plus a loss point per step and checkpoints Stop can keep."""
    from ..demo import demo_config
    recipe = demo_config(Path("lorakit-demo"), DEMO_STEPS, base_model).model_dump()
    return {**values_from_config(recipe), "logging_steps": 1, "save_steps": 20, "save_total_limit": 2}


CSS = """
#train-progress progress { width: 100%; height: 14px; }
#train-progress .line { font-family: ui-monospace, monospace; font-size: 15px; margin-top: 4px; }
"""


def _error(e: BaseException) -> str:
    """A message for the page: lorakit's own line for a user's mistake, the type otherwise."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"error: {text}" if isinstance(e, LorakitError) else f"error ({type(e).__name__}): {text}"


def _progress_html(st: RunStatus | None) -> str:
    if st is None:
        return '<div class="line">No run yet: choose data and press Start.</div>'
    total = st.total or 0
    value = total if st.state == "done" else (st.step or 0)
    bar = f'<progress value="{value}" max="{total}"></progress>' if total else "<progress></progress>"
    line = st.progress_line() if st.state == "starting" else f"{st.name}: {st.state} · " + st.progress_line()
    return f'<div data-state="{st.state}">{bar}<div class="line">{html.escape(line)}</div></div>'


def _chart(points: list[dict]) -> pd.DataFrame | None:
    # None, not an empty frame, until there are points: gradio 6's LinePlot draws no line at all
    # after starting from an empty frame.
    if not points:
        return None
    frame = pd.DataFrame(points, columns=["step", "loss", "series"])
    return frame.astype({"step": "int64", "loss": "float64", "series": "str"})


def _adapters_table(workdir: Workdir) -> str:
    rows = [a.summary_row() for a in workdir.adapters()]
    if not rows:
        return "No adapter yet: train one on the Train tab (or copy adapter folders into WORKDIR/adapters)."

    def cell(v) -> str:
        return html.escape(str(v)).replace("|", "\\|")
    lines = ["| " + " | ".join(SUMMARY_HEADERS) + " |", "|" + "---|" * len(SUMMARY_HEADERS)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def build_app(workdir: Workdir, runs: RunManager | None = None, session: ModelSession | None = None) -> gr.Blocks:
    runs = runs or RunManager()
    session = session or ModelSession()
    defaults = form_defaults()

    def base_choices():
        return workdir.base_model_choices()

    def adapter_choices():
        return workdir.adapter_choices()

    with gr.Blocks(title="lorakit", analytics_enabled=False) as page:
        gr.Markdown(f"# lorakit\nFine-tune with LoRA, talk to the result, compare it with the base model. "
                    f"Workdir: `{workdir.root}`", elem_id="header")
        with gr.Tabs(elem_id="tabs"):
            # ---------------------------------------------------------------- Train
            with gr.Tab("Train", id="train", elem_id="tab-train") as train_tab:
                with gr.Row():
                    with gr.Column(scale=1):
                        fields = {}
                        fields["base_model"] = gr.Dropdown(
                            base_choices(), value=DEFAULT_BASE_MODEL, allow_custom_value=True, label="Base model",
                            info="base_model: an alias, a model folder (WORKDIR/models/...), a .gguf file",
                            elem_id="train-base")
                        dataset = gr.Dropdown(workdir.dataset_choices(), value=None, label="Dataset",
                                              info="files in WORKDIR/data, or the built-in demo data",
                                              elem_id="train-dataset")
                        upload = gr.File(label="Upload a dataset (.json, .jsonl, .csv, .parquet: Alpaca, Dolly, "
                                         "messages, ShareGPT or text records)",
                                         file_types=[".json", ".jsonl", ".csv", ".parquet"], elem_id="train-upload",
                                         height=120)
                        upload_msg = gr.Markdown(elem_id="train-upload-msg")
                        with gr.Row():
                            copy_from = gr.Dropdown([("-", "")], value="", label="Copy parameters from",
                                                    info="fill the form from an adapter's config",
                                                    elem_id="train-copy-from")
                            resume = gr.Checkbox(False, label="Resume from its last checkpoint",
                                                 info="continue that run in its own folder", elem_id="train-resume")
                        name = gr.Textbox(label="Adapter name", placeholder="automatic: lora-<data>-<date>",
                                          info="the run's folder: WORKDIR/adapters/<name>", elem_id="train-name")
                    with gr.Column(scale=1):
                        with gr.Row():
                            preview_index = gr.Number(1, precision=0, minimum=1, label="Preview record",
                                                      elem_id="preview-index", scale=1)
                        preview = gr.HighlightedText(label="As the model sees it (the trained part highlighted)",
                                                     color_map={TRAINED: "green"}, show_legend=True,
                                                     combine_adjacent=True, elem_id="train-preview")
                        preview_info = gr.Markdown(elem_id="preview-info")
                with gr.Accordion("LoRA", open=True):
                    with gr.Row():
                        fields["lora_r"] = gr.Number(defaults["lora_r"], precision=0, label="Rank", info="lora_r")
                        fields["lora_alpha"] = gr.Number(defaults["lora_alpha"], label="Alpha",
                                                         info="lora_alpha (scale = alpha / rank)")
                        fields["lora_dropout"] = gr.Number(defaults["lora_dropout"], step=0.01, label="Dropout",
                                                           info="lora_dropout")
                    with gr.Row():
                        modules = target_module_choices(DEFAULT_BASE_MODEL)
                        targets = gr.CheckboxGroup(modules, value=[m for m in defaults["lora_target_modules"]
                                                                   if m in modules],
                                                   label="Target modules", info="lora_target_modules",
                                                   elem_id="train-targets", scale=3)
                        all_linear = gr.Checkbox(False, label="all-linear", info="every linear layer",
                                                 elem_id="train-all-linear", scale=1)
                with gr.Accordion("Training", open=True):
                    with gr.Row():
                        fields["learning_rate"] = gr.Number(defaults["learning_rate"], step=1e-5,
                                                            label="Learning rate", info="learning_rate")
                        fields["num_epochs"] = gr.Number(defaults["num_epochs"], label="Epochs",
                                                         info="num_epochs (used when max steps is 0)")
                        fields["max_steps"] = gr.Number(0, precision=0, label="Max steps",
                                                        info="max_steps: 0 = train by epochs", elem_id="train-max-steps")
                        fields["lr_scheduler_type"] = gr.Dropdown(list(SCHEDULERS), value=defaults["lr_scheduler_type"],
                                                                  label="Scheduler", info="lr_scheduler_type")
                    with gr.Row():
                        fields["batch_size"] = gr.Number(defaults["batch_size"], precision=0, label="Batch size",
                                                         info="batch_size: examples per optimizer step",
                                                         elem_id="train-batch")
                        fields["micro_batch_size"] = gr.Number(defaults["micro_batch_size"], precision=0,
                                                               label="Micro-batch size",
                                                               info="micro_batch_size: per forward pass",
                                                               elem_id="train-micro-batch")
                        fields["cutoff_len"] = gr.Number(defaults["cutoff_len"], precision=0, label="Cutoff length",
                                                         info="cutoff_len: most tokens per example")
                        fields["prompt_template_name"] = gr.Dropdown(
                            builtin_template_names(), value=defaults["prompt_template_name"], allow_custom_value=True,
                            label="Template", info="prompt_template_name (or a template file's path)")
                with gr.Accordion("More settings", open=False):
                    with gr.Row():
                        fields["warmup_steps"] = gr.Number(defaults["warmup_steps"], precision=0, label="Warm-up steps",
                                                           info="warmup_steps")
                        fields["weight_decay"] = gr.Number(defaults["weight_decay"], label="Weight decay",
                                                           info="weight_decay")
                        fields["val_set_size"] = gr.Number(defaults["val_set_size"], label="Validation examples",
                                                           info="val_set_size: a count or a fraction; 0 = none")
                        fields["seed"] = gr.Number(defaults["seed"], precision=0, label="Seed", info="seed")
                    with gr.Row():
                        fields["logging_steps"] = gr.Number(defaults["logging_steps"], precision=0,
                                                            label="Log every N steps", info="logging_steps",
                                                            elem_id="train-logging-steps")
                        fields["save_steps"] = gr.Number(defaults["save_steps"], precision=0,
                                                         label="Checkpoint every N steps", info="save_steps",
                                                         elem_id="train-save-steps")
                        fields["save_total_limit"] = gr.Number(defaults["save_total_limit"], precision=0,
                                                               label="Checkpoints kept", info="save_total_limit")
                        fields["precision"] = gr.Dropdown(["auto", "fp32", "bf16", "fp16"], value=defaults["precision"],
                                                          label="Precision", info="precision")
                    with gr.Row():
                        fields["train_on_inputs"] = gr.Checkbox(defaults["train_on_inputs"],
                                                                label="Train on the prompt too",
                                                                info="train_on_inputs")
                        targets_regex = gr.Textbox(label="Target modules as a regular expression",
                                                   info="over full module names; overrides the boxes above",
                                                   placeholder=r".*layers\.(0|1)\..*_proj")
                with gr.Row():
                    start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
                    stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="train-stop")
                progress = gr.HTML(_progress_html(None), elem_id="train-progress")
                train_status = gr.Markdown(elem_id="train-status")
                train_command = gr.Markdown(elem_id="train-command")
                loss_chart = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss", height=280,
                                         elem_id="train-loss-chart")
                timer = gr.Timer(1.0)
                seen = gr.State({})

            # ---------------------------------------------------------------- Models
            with gr.Tab("Models", id="models", elem_id="tab-models") as models_tab:
                with gr.Row():
                    models_base = gr.Dropdown(base_choices(), value=DEFAULT_BASE_MODEL, allow_custom_value=True,
                                              label="Base model", info="answers on Chat when no adapter is chosen",
                                              elem_id="models-base", scale=3)
                    load_base_btn = gr.Button("Load base model", elem_id="models-load-base", scale=1)
                gr.Markdown("### Adapters in the workdir")
                models_table = gr.Markdown(elem_id="models-table")
                with gr.Row():
                    models_adapter = gr.Dropdown([], label="Adapter", elem_id="models-adapter", scale=3)
                    apply_btn = gr.Button("Apply", elem_id="models-apply", scale=1)
                    remove_btn = gr.Button("Remove", elem_id="models-remove", scale=1)
                with gr.Row():
                    merge_name = gr.Textbox(label="Merged model name", placeholder="<adapter>-merged",
                                            info="written to WORKDIR/merged/<name>", scale=3)
                    merge_dtype = gr.Dropdown(["fp32", "bf16", "fp16"], value="fp32", label="dtype", scale=1)
                    merge_btn = gr.Button("Merge and export", elem_id="models-merge", scale=1)
                models_status = gr.Markdown(session.status(), elem_id="models-status")
                manifest = gr.Code(language="json", label="Manifest", elem_id="models-manifest")

            # ---------------------------------------------------------------- Chat
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_tab:
                with gr.Row():
                    chat_adapter = gr.Dropdown([("base model", "")], value="", label="Talk to",
                                               info="the base model (Models tab) or an adapter on its base",
                                               elem_id="chat-adapter", scale=2)
                    chat_template = gr.Dropdown([("auto", "")] + builtin_template_names(), value="",
                                                label="Template", info="auto: the adapter's own", scale=1)
                chat_system = gr.Textbox(label="System prompt (a character)", lines=2,
                                         placeholder="e.g. You are a pirate who answers in one sentence.",
                                         elem_id="chat-system")
                with gr.Accordion("Generation", open=False):
                    with gr.Row():
                        chat_max = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens")
                        chat_temp = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                        chat_top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
                        chat_top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k")
                        chat_rep = gr.Slider(1, 2, value=1.0, step=0.05, label="Repetition penalty")
                        chat_seed = gr.Number(None, precision=0, label="Seed (sampling)")
                chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chat-bot", buttons=["copy"])
                with gr.Row():
                    chat_input = gr.Textbox(show_label=False, placeholder="Message (Enter sends)", scale=5,
                                            elem_id="chat-input")
                    send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                    clear_btn = gr.Button("Clear", scale=1, elem_id="chat-clear")
                chat_status = gr.Markdown(elem_id="chat-status")
                chat_turns = gr.State([])

            # ---------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare", elem_id="tab-compare") as compare_tab:
                compare_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="compare-prompt")
                with gr.Row():
                    compare_adapters = gr.Dropdown([], multiselect=True, max_choices=MAX_COMPARE,
                                                   label="Adapters beside the base model", elem_id="compare-adapters",
                                                   scale=3)
                    compare_template = gr.Dropdown([("auto", "")] + builtin_template_names(), value="",
                                                   label="Template", info="auto: the first adapter's", scale=1)
                    compare_max = gr.Slider(1, 512, value=96, step=1, label="Max new tokens", scale=1)
                compare_system = gr.Textbox(label="System prompt (optional)")
                compare_btn = gr.Button("Compare", variant="primary", elem_id="compare-run")
                with gr.Row():
                    answers = [gr.Textbox(label="base model", lines=8, interactive=False, elem_id="compare-answer-0")]
                    answers += [gr.Textbox(label=f"adapter {i}", lines=8, interactive=False, visible=False,
                                           elem_id=f"compare-answer-{i}") for i in range(1, MAX_COMPARE + 1)]
                compare_status = gr.Markdown(elem_id="compare-status")

            # ---------------------------------------------------------------- Evaluate
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate") as eval_tab:
                with gr.Row():
                    eval_data = gr.Dropdown(workdir.dataset_choices(heldout=True), multiselect=True,
                                            label="Eval data", elem_id="eval-data", scale=3)
                    eval_upload = gr.File(label="Upload eval data", file_types=[".json", ".jsonl", ".csv", ".parquet"],
                                          height=120, scale=2, elem_id="eval-upload")
                with gr.Row():
                    eval_adapters = gr.Dropdown([], multiselect=True, label="Adapters", elem_id="eval-adapters", scale=3)
                    eval_base = gr.Dropdown([("the first adapter's base", "")] + base_choices(), value="",
                                            allow_custom_value=True, label="Base model", scale=2)
                with gr.Row():
                    eval_metrics = gr.CheckboxGroup(list(METRICS), value=list(METRICS), label="Metrics", scale=3)
                    eval_limit = gr.Number(20, precision=0, label="Examples per set (0 = all)", scale=1,
                                           elem_id="eval-limit")
                    eval_max = gr.Number(64, precision=0, label="Max new tokens", scale=1, elem_id="eval-max-tokens")
                eval_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
                eval_status = gr.Markdown(elem_id="eval-status")
                eval_table = gr.Dataframe(interactive=False, label="Scores", elem_id="eval-table")
                eval_plots = gr.Gallery(label="Plots", columns=3, height=320, object_fit="contain",
                                        elem_id="eval-plots")
                eval_html = gr.File(label="report.html", elem_id="eval-html")
                eval_report = gr.Markdown(elem_id="eval-report")

        field_inputs = [fields[k] for k in FIELD_KEYS]
        target_inputs = [targets, all_linear, targets_regex]

        def form_values(args) -> dict:
            values = dict(zip(FIELD_KEYS, args[:len(FIELD_KEYS)]))
            boxes, every_linear, regex = args[len(FIELD_KEYS):]
            values["lora_target_modules"] = ("all-linear" if every_linear else
                                             (regex.strip() if (regex or "").strip() else list(boxes or [])))
            return values

        def fill_form(values: dict, note: str = "") -> dict:
            """Updates setting every form field from config values."""
            out = {fields[k]: (0 if k == "max_steps" and (values.get(k) or 0) < 0 else values[k])
                   for k in FIELD_KEYS if k in values}
            t = values.get("lora_target_modules")
            modules = target_module_choices(values.get("base_model") or DEFAULT_BASE_MODEL)
            if t == "all-linear":
                out.update({all_linear: True, targets_regex: ""})
            elif isinstance(t, str):
                out.update({all_linear: False, targets_regex: t})
            elif isinstance(t, list):  # names the model lacks stay visible (training will say so)
                out.update({all_linear: False, targets_regex: "",
                            targets: gr.update(choices=modules + [m for m in t if m not in modules], value=t)})
            return out

        # ---- refreshing the lists -------------------------------------------------------
        def lists_update() -> dict:
            adapters = adapter_choices()
            runs_with_config = [(a.name, a.name) for a in workdir.adapters() if a.settings()]
            return {
                chat_adapter: gr.update(choices=[("base model", "")] + adapters),
                compare_adapters: gr.update(choices=adapters),
                eval_adapters: gr.update(choices=adapters),
                models_adapter: gr.update(choices=adapters),
                models_table: _adapters_table(workdir),
                copy_from: gr.update(choices=[("-", "")] + runs_with_config),
                dataset: gr.update(choices=workdir.dataset_choices()),
                eval_data: gr.update(choices=workdir.dataset_choices(heldout=True)),
                models_status: session.status(),
            }

        list_outputs = [chat_adapter, compare_adapters, eval_adapters, models_adapter, models_table, copy_from,
                        dataset, eval_data, models_status]
        for tab in (train_tab, models_tab, chat_tab, compare_tab, eval_tab):
            tab.select(lists_update, None, list_outputs, show_progress="hidden")

        # ---- Train: data, preview, form ---------------------------------------------------
        def on_upload(path):
            if not path:
                return {upload_msg: ""}
            try:
                saved = workdir.save_upload(path)
            except Exception as e:  # noqa: BLE001 - a bad file: say why, naming the record
                return {upload_msg: f"**Upload refused.** {_error(e)}", upload: None}
            return {upload_msg: f"Saved as `{saved.relative_to(workdir.root)}`: checked, ready to train on.",
                    dataset: gr.update(choices=workdir.dataset_choices(), value=str(saved)), upload: None}

        upload.upload(on_upload, upload, [upload_msg, dataset, upload])

        def on_preview(data_value, template, base, index, cutoff, train_on_inputs):
            if not data_value:
                return {preview: None, preview_info: "Choose a dataset to see a record as the model will."}
            try:
                path = workdir.resolve_dataset(data_value)
                segments, line = preview_record(path, template or "alpaca", base or DEFAULT_BASE_MODEL,
                                                int(index or 1) - 1, int(cutoff or 256), bool(train_on_inputs))
            except Exception as e:  # noqa: BLE001 - a bad file or template: say so where the preview goes
                return {preview: None, preview_info: _error(e)}
            return {preview: segments, preview_info: line}

        preview_inputs = [dataset, fields["prompt_template_name"], fields["base_model"], preview_index,
                          fields["cutoff_len"], fields["train_on_inputs"]]
        for trigger in (fields["prompt_template_name"], preview_index, fields["cutoff_len"], fields["train_on_inputs"]):
            trigger.change(on_preview, preview_inputs, [preview, preview_info], show_progress="hidden")

        dataset.change(on_preview, preview_inputs, [preview, preview_info], show_progress="hidden")

        def on_dataset_chosen(data_value, base):
            """The user picked a dataset (not a programmatic change: uploads and 'copy parameters
            from' set it too). The demo data brings the settings `lorakit demo` uses."""
            if data_value != DEMO_TRAIN:
                return {upload_msg: ""}
            return {**fill_form(demo_settings(base or DEFAULT_BASE_MODEL)),
                    upload_msg: ("Demo data: an assistant named *Marlowe*, made by *Juniper Labs*, a persona the "
                                 "base model does not have. The demo's settings are filled in (as `lorakit demo`): "
                                 f"{DEMO_STEPS} steps of batch 8 at learning rate 1e-3 on the attention layers; "
                                 "change them freely, then Start.")}

        dataset.input(on_dataset_chosen, [dataset, fields["base_model"]], [upload_msg, *field_inputs, *target_inputs])

        def on_base(base, current, *preview_args):
            modules = target_module_choices(base or DEFAULT_BASE_MODEL)
            out = on_preview(*preview_args)
            out[targets] = gr.update(choices=modules, value=[m for m in (current or []) if m in modules])
            return out

        fields["base_model"].change(on_base, [fields["base_model"], targets, *preview_inputs],
                                    [targets, preview, preview_info])

        def on_copy_from(run_name):
            if not run_name:
                return {resume: gr.update(value=False)}
            info = workdir.adapter(run_name)
            config = info.settings()
            values = values_from_config(config)
            out = fill_form(values)
            data_path = config.get("data_path")
            if data_path and Path(data_path).is_file():
                value = workdir.dataset_value(data_path)
                choices = workdir.dataset_choices()
                if value not in [v for _, v in choices]:  # a file outside WORKDIR/data (a CLI run)
                    choices.append((str(data_path), value))
                out[dataset] = gr.update(choices=choices, value=value)
            out[resume] = gr.update(value=False, interactive=bool(info.checkpoints),
                                    info=(f"continue from {info.checkpoints[-1].name} in its own folder"
                                          if info.checkpoints else "it has no complete checkpoint"))
            return out

        copy_from.input(on_copy_from, copy_from, [*field_inputs, *target_inputs, dataset, resume])

        # ---- Train: start, stop, progress ---------------------------------------------------
        def on_start(data_value, run_name, copied, resume_it, *args):
            try:
                if resume_it and not copied:
                    raise LorakitError("resume: pick the run under 'Copy parameters from' first")
                data_path = workdir.resolve_dataset(data_value)
                run = prepare_run(workdir, form_values(args), data_path,
                                  name=copied if resume_it else run_name, resume=bool(resume_it))
                runs.start(run)
            except Exception as e:  # noqa: BLE001 - bad settings: one line on the page
                return {train_status: f"**Not started.** {_error(e)}"}
            return {train_status: f"Started **{run.name}**: loading data and model...", resume: False,
                    train_command: f"Repeat it from a terminal: `{run.command_line}`  \nOutput: `{run.log_path}`",
                    progress: _progress_html(run.status()), start_btn: gr.update(interactive=False),
                    stop_btn: gr.update(interactive=True), loss_chart: _chart([])}

        start_btn.click(on_start, [dataset, name, copy_from, resume, *field_inputs, *target_inputs],
                        [train_status, train_command, progress, start_btn, stop_btn, loss_chart, resume])

        def on_stop():
            if runs.stop():
                return {train_status: "Stopping: the run ends at its next step; its complete checkpoints are kept.",
                        stop_btn: gr.update(interactive=False)}
            return {train_status: "No run in progress."}

        stop_btn.click(on_stop, None, [train_status, stop_btn])

        def on_tick(last: dict):
            run = runs.run
            if run is None:
                return gr.skip()
            st = run.status()
            out = {}
            if not (last.get("run") == run.name and last.get("state") == st.state and st.finished):
                out[progress] = _progress_html(st)
            if last.get("run") != run.name or last.get("log_lines") != st.log_lines:
                out[loss_chart] = _chart(st.points)
            if last.get("run") != run.name or last.get("state") != st.state:
                if st.message or st.state == "training":
                    out[train_status] = st.message or f"Training **{run.name}**..."
                if last.get("run") != run.name:
                    out[train_command] = (f"Repeat it from a terminal: `{run.command_line}`  \n"
                                          f"Output: `{run.log_path}`")
                out[start_btn] = gr.update(interactive=st.finished)
                out[stop_btn] = gr.update(interactive=st.state in ("starting", "training"))
                if st.finished:
                    out.update(lists_update())
            out[seen] = {"run": run.name, "state": st.state, "log_lines": st.log_lines}
            return out

        timer.tick(on_tick, seen, [progress, loss_chart, train_status, train_command, start_btn, stop_btn, seen,
                                   *list_outputs], show_progress="hidden")

        # ---- Models -------------------------------------------------------------------------
        def on_load_base(base):
            try:
                session.use_base(base or DEFAULT_BASE_MODEL)
            except Exception as e:  # noqa: BLE001
                return _error(e)
            return session.status()

        load_base_btn.click(on_load_base, models_base, models_status)

        def on_models_adapter(key):
            if not key:
                return ""
            try:
                return manifest_text(workdir.resolve_adapter(key))
            except Exception as e:  # noqa: BLE001
                return _error(e)

        models_adapter.change(on_models_adapter, models_adapter, manifest)

        def on_apply(key, base):
            try:
                speaker = speaker_for(workdir, key, base or DEFAULT_BASE_MODEL)
                if not key:
                    raise LorakitError("apply: choose an adapter")
                session.prepare(speaker)
            except Exception as e:  # noqa: BLE001
                return _error(e)
            return f"Applied {key}. " + session.status()

        apply_btn.click(on_apply, [models_adapter, models_base], models_status)

        def on_remove(key):
            try:
                session.remove(key)
            except Exception as e:  # noqa: BLE001
                return _error(e)
            return f"Removed {key}. " + session.status()

        remove_btn.click(on_remove, models_adapter, models_status)

        def on_merge(key, merged_name, dtype):
            try:
                if not key:
                    raise LorakitError("merge: choose an adapter")
                path, command = merge_into_workdir(workdir, key, merged_name, dtype)
            except Exception as e:  # noqa: BLE001
                return {models_status: _error(e)}
            return {models_status: f"Merged into `{path}` (a standalone model folder; it is offered as a base "
                                   f"model now). Repeat from a terminal: `{command}`",
                    models_base: gr.update(choices=base_choices()), fields["base_model"]: gr.update(choices=base_choices())}

        merge_btn.click(on_merge, [models_adapter, merge_name, merge_dtype],
                        [models_status, models_base, fields["base_model"]])

        # ---- Chat ---------------------------------------------------------------------------
        def on_send(message, messages, turns, key, template, system, max_new, temp, top_p, top_k, rep, seed, base):
            message = (message or "").strip()
            if not message:
                yield gr.skip()
                return
            messages = list(messages or []) + [{"role": "user", "content": message},
                                               {"role": "assistant", "content": "..."}]
            try:
                speaker = speaker_for(workdir, key, base or DEFAULT_BASE_MODEL)
                params = GenerationParams(max_new_tokens=int(max_new), temperature=float(temp), top_p=float(top_p),
                                          top_k=int(top_k), repetition_penalty=float(rep),
                                          seed=int(seed) if seed not in (None, "") else None)
                from ..data.records import Turn
                history = [Turn(role, content) for role, content in turns or []]
                yield {chatbot: messages, chat_input: "", chat_status: f"{speaker.label} is answering..."}
                text = ""
                for text in session.stream(speaker, message, history, system or "", params, template or None):
                    messages[-1] = {"role": "assistant", "content": text}
                    yield {chatbot: messages}
            except Exception as e:  # noqa: BLE001
                yield {chatbot: messages[:-2], chat_input: message, chat_status: _error(e)}
                return
            messages[-1] = {"role": "assistant", "content": text or "(empty answer)"}
            turns = list(turns or []) + [["user", message], ["assistant", text]]
            yield {chatbot: messages, chat_turns: turns, chat_status: f"answered by {speaker.label}. {session.status()}"}

        chat_inputs = [chat_input, chatbot, chat_turns, chat_adapter, chat_template, chat_system, chat_max, chat_temp,
                       chat_top_p, chat_top_k, chat_rep, chat_seed, models_base]
        chat_outputs = [chatbot, chat_input, chat_status, chat_turns]
        send_btn.click(on_send, chat_inputs, chat_outputs)
        chat_input.submit(on_send, chat_inputs, chat_outputs)
        clear_btn.click(lambda: ([], [], ""), None, [chatbot, chat_turns, chat_status])

        # ---- Compare ------------------------------------------------------------------------
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
                    yield {answers[i]: gr.update(value=answer or "(empty answer)"),
                           compare_status: (f"template {template_name}, greedy, at most {int(max_new)} new tokens"
                                            if done else f"answering... ({i + 1} of {len(speakers)} done)")}
            except Exception as e:  # noqa: BLE001
                yield {compare_status: _error(e)}

        compare_btn.click(on_compare, [compare_prompt, compare_adapters, compare_template, compare_max,
                                       compare_system, models_base], [*answers, compare_status])

        # ---- Evaluate -----------------------------------------------------------------------
        def on_eval_upload(path, chosen):
            if not path:
                return gr.skip()
            try:
                saved = workdir.save_upload(path)
            except Exception as e:  # noqa: BLE001
                return {eval_status: f"**Upload refused.** {_error(e)}", eval_upload: None}
            return {eval_status: f"Saved as `{saved.relative_to(workdir.root)}`.", eval_upload: None,
                    eval_data: gr.update(choices=workdir.dataset_choices(heldout=True),
                                         value=list(chosen or []) + [str(saved)])}

        eval_upload.upload(on_eval_upload, [eval_upload, eval_data], [eval_status, eval_data, eval_upload])

        def on_eval(data_values, keys, base, metrics, limit, max_new):
            try:
                yield {eval_status: "evaluating (answers are generated for every example; this can take a while)..."}
                result = run_evaluation(workdir, list(data_values or []), list(keys or []), base or None,
                                        list(metrics or []) or None, int(limit or 0) or None, int(max_new or 64))
            except Exception as e:  # noqa: BLE001
                yield {eval_status: _error(e)}
                return
            yield {eval_status: f"Report in `{result.out_dir}`. Repeat from a terminal: `{result.command}`",
                   eval_table: pd.DataFrame(result.rows, columns=result.headers),
                   eval_plots: [str(p) for p in result.plots], eval_html: str(result.html),
                   eval_report: result.markdown}

        eval_btn.click(on_eval, [eval_data, eval_adapters, eval_base, eval_metrics, eval_limit, eval_max],
                       [eval_status, eval_table, eval_plots, eval_html, eval_report])

        page.load(lists_update, None, list_outputs)
    return page


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def launch(workdir: str | Path = "lorakit-ui", host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the page until interrupted; a training run still going is stopped on the way out
    (its complete checkpoints stay)."""
    import atexit
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        if os.name == "posix":  # as the server binds: connections of a closed server (TIME_WAIT) do not count
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise LorakitError(f"--port: cannot listen on {host}:{port} ({e.strerror or e}); "
                               "is another page running there? choose another --port") from None
    wd = Workdir(workdir)
    runs = RunManager()
    atexit.register(runs.shutdown)
    if threading.current_thread() is threading.main_thread():
        # `kill` (SIGTERM) ends the page like Ctrl-C: the server closes and a run in progress is stopped
        signal.signal(signal.SIGTERM, _interrupt)
    page = build_app(wd, runs, ModelSession())
    page.queue(default_concurrency_limit=4)
    print(f"lorakit ui: workdir {wd.root}", flush=True)
    page.launch(server_name=host, server_port=port, show_error=True, allowed_paths=[str(wd.root)],
                theme=gr.themes.Default(primary_hue="indigo"), css=CSS, footer_links=["gradio"])
