"""The Chat tab: talk to the base model (chosen on the Models tab) or an adapter on it, with a
system prompt and generation settings; the answer streams into the chat."""

from __future__ import annotations

import gradio as gr

from ...data.records import Turn
from ...data.templates import builtin_template_names
from ...infer.generate import GenerationParams
from ...models.registry import DEFAULT_BASE_MODEL
from ..inference import speaker_for
from .common import Shared, error_text


def build(shared: Shared) -> gr.Tab:
    workdir, session = shared.workdir, shared.session
    models_base = shared["models.base"]

    with gr.Tab("Chat", id="chat", elem_id="tab-chat") as tab:
        with gr.Row():
            chat_adapter = gr.Dropdown(
                [("base model", "")],
                value="",
                label="Talk to",
                info="the base model (Models tab) or an adapter on its base",
                elem_id="chat-adapter",
                scale=2,
            )
            chat_template = gr.Dropdown(
                [("auto", "")] + builtin_template_names(),
                value="",
                label="Template",
                info="auto: the adapter's own",
                scale=1,
            )
        chat_system = gr.Textbox(
            label="System prompt (a character)",
            lines=2,
            placeholder="e.g. You are a pirate who answers in one sentence.",
            elem_id="chat-system",
        )
        with gr.Accordion("Generation", open=False), gr.Row():
            chat_max = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens")
            chat_temp = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            chat_top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
            chat_top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k")
            chat_rep = gr.Slider(1, 2, value=1.0, step=0.05, label="Repetition penalty")
            chat_seed = gr.Number(None, precision=0, label="Seed (sampling)")
        chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chat-bot", buttons=["copy"])
        with gr.Row():
            chat_input = gr.Textbox(
                show_label=False, placeholder="Message (Enter sends)", scale=5, elem_id="chat-input"
            )
            send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            clear_btn = gr.Button("Clear", scale=1, elem_id="chat-clear")
        chat_status = gr.Markdown(elem_id="chat-status")
        chat_turns = gr.State([])

    shared.refreshes(chat_adapter, lambda: gr.update(choices=[("base model", "")] + workdir.adapter_choices()))

    def on_send(message, messages, turns, key, template, system, max_new, temp, top_p, top_k, rep, seed, base):
        message = (message or "").strip()
        if not message:
            yield gr.skip()
            return
        messages = list(messages or []) + [
            {"role": "user", "content": message},
            {"role": "assistant", "content": "..."},
        ]
        try:
            speaker = speaker_for(workdir, key, base or DEFAULT_BASE_MODEL)
            params = GenerationParams(
                max_new_tokens=int(max_new),
                temperature=float(temp),
                top_p=float(top_p),
                top_k=int(top_k),
                repetition_penalty=float(rep),
                seed=int(seed) if seed not in (None, "") else None,
            )
            history = [Turn(role, content) for role, content in turns or []]
            yield {chatbot: messages, chat_input: "", chat_status: f"{speaker.label} is answering..."}
            text = ""
            for text in session.stream(speaker, message, history, system or "", params, template or None):
                messages[-1] = {"role": "assistant", "content": text}
                yield {chatbot: messages}
        except Exception as e:
            yield {chatbot: messages[:-2], chat_input: message, chat_status: error_text(e)}
            return
        messages[-1] = {"role": "assistant", "content": text or "(empty answer)"}
        turns = list(turns or []) + [["user", message], ["assistant", text]]
        yield {chatbot: messages, chat_turns: turns, chat_status: f"answered by {speaker.label}. {session.status()}"}

    chat_inputs = [
        chat_input,
        chatbot,
        chat_turns,
        chat_adapter,
        chat_template,
        chat_system,
        chat_max,
        chat_temp,
        chat_top_p,
        chat_top_k,
        chat_rep,
        chat_seed,
        models_base,
    ]
    chat_outputs = [chatbot, chat_input, chat_status, chat_turns]
    send_btn.click(on_send, chat_inputs, chat_outputs)
    chat_input.submit(on_send, chat_inputs, chat_outputs)
    clear_btn.click(lambda: ([], [], ""), None, [chatbot, chat_turns, chat_status])
    return tab
