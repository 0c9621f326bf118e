"""lorakit export --to ollama without Ollama or llama.cpp: the Modelfile's TEMPLATE, rendered by a
small interpreter of exactly the Go template constructs lorakit writes (with Ollama's rule that the
Modelfile's SYSTEM comes first when a conversation has no system message), gives lorakit's own
prompt text (build_prompt); the Modelfile lists FROM/ADAPTER/PARAMETER lines; the GGUF step is a
stand-in that writes dummy files."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from random_adapter import make_random_adapter

from lorakit.data.records import Turn
from lorakit.data.templates import PromptTemplate, load_template
from lorakit.infer.export import CHECK_CONVERSATIONS, Conversation, messages_for
from lorakit.infer.ollama import (
    CHATML_GO_TEMPLATE,
    MODELFILE,
    OllamaExportError,
    export_ollama,
    go_template,
)
from lorakit.infer.verify import VerificationFailed
from lorakit.runfolder import EXPORT_RECORD, UNVERIFIED_MARKER

USER_TEMPLATE = {
    "description": "A user's template with quotes, braces, {{ go }} actions and triple quotes.",
    "prompt_input": "<<SYS>>\n### User:\n{instruction}\n\n### Context: {input}\n### Bot:\n",
    "prompt_no_input": '<<SYS "q" """ {{ .System }} {{- x -}}>>\n### User:\n{instruction}\n\t}}### Bot:\\n\n',
    "response_split": "### Bot:",
}

SMOL_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# ---- a Go text/template interpreter for the constructs lorakit emits ---------------------------

_ACTION = re.compile(r'\{\{(-\s)?((?:"(?:\\.|[^"\\])*"|[^"}]|\}(?!\}))*?)(\s-)?\}\}', re.S)
_TOKEN = re.compile(r'\s*("(?:\\.|[^"\\])*"|\(|\)|:=|,|\$\.?[\w.]*|\.[\w.]*|\d+|[A-Za-z_]\w*)')


def _parse(src: str) -> list:
    """Text and actions; {{- / -}} trim the whitespace beside them, as Go does."""
    items, pos = [], 0
    for m in _ACTION.finditer(src):
        items.append(["text", src[pos : m.start()]])
        if m.group(1) and items[-1][0] == "text":
            items[-1][1] = items[-1][1].rstrip()
        items.append(["action", m.group(2).strip(), bool(m.group(3))])
        pos = m.end()
    items.append(["text", src[pos:]])
    for i, item in enumerate(items):
        if item[0] == "action" and item[2] and i + 1 < len(items):
            items[i + 1][1] = items[i + 1][1].lstrip()
    out = [("text", it[1]) if it[0] == "text" else ("action", it[1]) for it in items]
    tree, rest = _block(out, 0)
    assert rest == len(out), "unbalanced {{ end }}"
    return tree


def _block(items, i):
    """Nodes until an else/end at this level: (nodes, index of that item)."""
    nodes = []
    while i < len(items):
        kind, body = items[i]
        if kind == "text":
            nodes.append(("text", body))
            i += 1
        elif body == "end" or body == "else" or body.startswith("else if "):
            return nodes, i
        elif body.startswith("if ") or body.startswith("range "):
            head = body
            then, i = _block(items, i + 1)
            branches = [(head, then)]
            while items[i][1] != "end":
                head = items[i][1]
                part, i = _block(items, i + 1)
                branches.append((head, part))
            nodes.append(("block", branches))
            i += 1
        else:
            nodes.append(("expr", body))
            i += 1
    return nodes, i


def _tokens(expr: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(expr.rstrip()):
        m = _TOKEN.match(expr, pos)
        assert m, f"cannot read {expr[pos:]!r}"
        tokens.append(m.group(1))
        pos = m.end()
    return tokens


FUNCS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "and": lambda *a: next((x for x in a if not x), a[-1]),
    "not": lambda a: not a,
    "len": len,
    "slice": lambda x, i: x[i:],
}


def _value(tok: str, dot, scope: dict):
    if tok.startswith('"'):
        return json.loads(tok)
    if tok.isdigit():
        return int(tok)
    if tok.startswith("$"):
        name, _, path = tok.partition(".")
        value = scope["$"] if name == "$" else scope[name]
    else:
        value, path = dot, tok[1:]
    for part in filter(None, path.split(".")):
        value = value[part]
    return value


def _eval(tokens: list[str], dot, scope: dict):
    def term(i):
        if tokens[i] == "(":
            value, i = call(i + 1)
            assert tokens[i] == ")"
            return value, i + 1
        return _value(tokens[i], dot, scope), i + 1

    def call(i):
        if tokens[i] in FUNCS:
            fn, args, i = FUNCS[tokens[i]], [], i + 1
            while i < len(tokens) and tokens[i] != ")":
                value, i = term(i)
                args.append(value)
            return fn(*args), i
        return term(i)

    value, i = call(0)
    assert i == len(tokens), tokens
    return value


def _run(nodes, dot, scope: dict, out: list[str]) -> None:
    for kind, body in nodes:
        if kind == "text":
            out.append(body)
        elif kind == "expr":
            tokens = _tokens(body)
            if len(tokens) > 2 and tokens[1] == ":=":
                scope[tokens[0]] = _eval(tokens[2:], dot, scope)
            else:
                out.append(str(_eval(tokens, dot, scope)))
        else:
            head, part = body[0]
            if head.startswith("range "):
                tokens = _tokens(head[len("range ") :])
                names = []
                if ":=" in tokens:
                    names = [t for t in tokens[: tokens.index(":=")] if t != ","]
                    tokens = tokens[tokens.index(":=") + 1 :]
                for i, item in enumerate(_eval(tokens, dot, scope)):
                    inner = dict(scope)
                    if len(names) == 2:
                        inner[names[0]], inner[names[1]] = i, item
                    _run(part, item, inner, out)
                continue
            for head, part in body:
                cond = head.removeprefix("else ").removeprefix("if ") if head != "else" else None
                if cond is None or _eval(_tokens(cond), dot, scope):
                    _run(part, dot, scope, out)
                    break


def render_ollama(template_text: str, messages: list[dict], system: str | None = None) -> str:
    """What Ollama's chat renders: the Modelfile's SYSTEM first when no system message is given."""
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}] + messages
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    out: list[str] = []
    _run(_parse(template_text), data, {"$": data}, out)
    return "".join(out)


def test_interpreter_trims_like_go():
    assert render_ollama('a  {{- "b" -}}  \n c{{ if eq 1 1 }}d{{ else }}e{{ end }}', []) == "abcd"


# ---- the TEMPLATE against lorakit's prompt ----------------------------------------------------


def _conversations(template: PromptTemplate) -> list[Conversation]:
    weird = CHECK_CONVERSATIONS[5]
    convs = CHECK_CONVERSATIONS + [
        Conversation(weird.instruction, system=weird.system),
        Conversation('Q with """triple""" {{ .Content }} quotes', system='S """ {{- end }}'),
        Conversation("Next?", history=(Turn("user", "A"), Turn("assistant", "B\n")), system="Sys"),
    ]
    if template.kind == "alpaca":  # an Ollama message has no Alpaca input field
        convs = [c for c in convs if not c.input or c.history]
    return convs


@pytest.fixture(scope="module")
def user_template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "my_tpl.json"
    path.write_text(json.dumps(USER_TEMPLATE), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["alpaca", "alpaca_short", "alpaca_legacy", "user", "chat", "smol-chatml"])
def test_modelfile_template_renders_lorakit_prompt(name, tiny_tokenizer, user_template_file):
    if name == "user":
        template = load_template(str(user_template_file))
    elif name == "smol-chatml":
        template = PromptTemplate(name="chat", kind="chat", chat_template=SMOL_CHATML)
    else:
        template = load_template(name, tiny_tokenizer)
    text, system = go_template(template, tiny_tokenizer)
    assert '"""' not in text
    if name == "smol-chatml":
        assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    else:
        assert system is None
    if template.kind == "chat":
        assert text == CHATML_GO_TEMPLATE
    convs = _conversations(template)
    assert len(convs) >= 8
    for conv in convs:
        want = template.build_prompt(
            conv.instruction, conv.input, list(conv.history), conv.system, tokenizer=tiny_tokenizer
        )
        messages = [{"role": m["role"], "content": m["content"]} for m in messages_for(template, conv)]
        assert render_ollama(text, messages, system) == want, conv


def test_other_chat_templates_are_refused(tiny_tokenizer):
    template = PromptTemplate(name="chat", kind="chat", chat_template=ZEPHYR)
    with pytest.raises(OllamaExportError, match="use --to gguf"):
        go_template(template, tiny_tokenizer)


# ---- the folder and its Modelfile -------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("ollama-adapter"))


def fake_gguf(calls, fail=False):
    def step(adapter, out, *, base=None, quant="q8_0", verify=True, llama_cpp_dir=None, **checks):
        calls.append({"adapter": adapter, "base": base, "quant": quant, "verify": verify, **checks})
        out.mkdir(parents=True)
        name = "model-q8_0-UNVERIFIED.gguf" if fail else "model-q8_0.gguf"
        (out / name).write_bytes(b"GGUF")
        figures = {"greedy_identical": 1 if fail else 8, "prompts": 8}
        if fail:
            raise VerificationFailed("verification failed (q8_0): simulated", figures, {"gguf_file": name})
        return {"gguf_file": name, "verification": figures}

    return step


def fake_gguf_lora(adapter, out, *, base=None, verify=True, llama_cpp_dir=None, **checks):
    out.mkdir(parents=True)
    (out / "base-f16.gguf").write_bytes(b"GGUF")
    (out / "adapter-f16.gguf").write_bytes(b"GGUF")
    return {"lora_file": "adapter-f16.gguf", "base_gguf_file": str(out / "base-f16.gguf")}


def _modelfile_lines(folder):
    return (folder / MODELFILE).read_text(encoding="utf-8").splitlines()


def test_merged_modelfile(adapter, tmp_path):
    calls = []
    out = tmp_path / "ollama"
    record = export_ollama(adapter, out, quant="q4_k_m", gguf_step=fake_gguf(calls))
    assert calls and calls[0]["quant"] == "q4_k_m"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", EXPORT_RECORD, "model-q8_0.gguf"]
    lines = _modelfile_lines(out)
    assert "FROM ./model-q8_0.gguf" in lines
    assert not any(line.startswith("ADAPTER") for line in lines)
    stops = [line for line in lines if line.startswith("PARAMETER stop ")]
    # plain peft adapter: alpaca; its markers and the EOS token text of the tiny tokenizer
    assert stops == [
        'PARAMETER stop "### Instruction:"',
        'PARAMETER stop "### Input:"',
        'PARAMETER stop "### Response:"',
        'PARAMETER stop "<|im_end|>"',
    ]
    assert "PARAMETER temperature 0.0" in lines
    assert not any(line.startswith("SYSTEM") for line in lines)
    text = (out / MODELFILE).read_text(encoding="utf-8")
    template_text = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template_text == go_template(load_template("alpaca"))[0]
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert f"ollama create {adapter.name} -f Modelfile" in readme and f"ollama run {adapter.name}" in readme
    saved = json.loads((out / EXPORT_RECORD).read_text())
    assert saved["verification"] == {"greedy_identical": 8, "prompts": 8} and saved["verified"] is True
    assert saved["gguf_files"] == ["model-q8_0.gguf"] and saved["files"][0]["name"] == "model-q8_0.gguf"
    assert saved["files"][0]["bytes"] == 4 and len(saved["files"][0]["sha256"]) == 64
    assert record["modelfile"] == str(out / MODELFILE)


def test_a_failed_gguf_check_keeps_the_folder_marked(adapter, tmp_path):
    out = tmp_path / "ollama"
    with pytest.raises(VerificationFailed, match="simulated; kept at"):
        export_ollama(adapter, out, gguf_step=fake_gguf([], fail=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["Modelfile", "README.md", EXPORT_RECORD, UNVERIFIED_MARKER, "model-q8_0-UNVERIFIED.gguf"]
    )
    assert _modelfile_lines(out)[0].startswith("# UNVERIFIED")
    assert "FROM ./model-q8_0-UNVERIFIED.gguf" in _modelfile_lines(out)
    saved = json.loads((out / EXPORT_RECORD).read_text())
    assert saved["verified"] is False and saved["verification"]["greedy_identical"] == 1


def test_lora_only_chatml_modelfile(adapter, tiny_tokenizer, tmp_path):
    chat_adapter = tmp_path / "chat-adapter"
    shutil.copytree(adapter, chat_adapter)
    load_template("chat", tiny_tokenizer).save(chat_adapter)
    out = tmp_path / "ollama"
    export_ollama(chat_adapter, out, lora_only=True, gguf_step=fake_gguf_lora, name="my-model")
    lines = _modelfile_lines(out)
    assert "FROM ./base-f16.gguf" in lines and "ADAPTER ./adapter-f16.gguf" in lines
    assert [line for line in lines if line.startswith("PARAMETER stop ")] == ['PARAMETER stop "<|im_end|>"']
    assert CHATML_GO_TEMPLATE in (out / MODELFILE).read_text(encoding="utf-8")
    assert "ollama create my-model -f Modelfile" in (out / "README.md").read_text()
    assert not (out / ".gguf-step").exists()


def test_refused_chat_template_writes_nothing(adapter, tmp_path):
    odd = tmp_path / "zephyr-adapter"
    shutil.copytree(adapter, odd)
    PromptTemplate(name="chat", kind="chat", chat_template=ZEPHYR).save(odd)
    calls = []
    with pytest.raises(OllamaExportError, match="use --to gguf"):
        export_ollama(odd, tmp_path / "out", gguf_step=fake_gguf(calls))
    assert calls == [] and not (tmp_path / "out").exists()
