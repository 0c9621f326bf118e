"""lorakit generate/chat --gguf: a GGUF from ``lorakit export --to gguf`` run by llama.cpp, prompted with
lorakit's exact prompt ids and stopped at its markers. The model is test_export_gguf.py's tiny random
Llama with smollm2's tokenizer (llama.cpp's converter only accepts tokenizers it knows)."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from random_adapter import make_random_adapter
from tiny_models import build_tiny_smol_model

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'lorakit[gguf]'")
pytest.importorskip("sentencepiece", reason="llama.cpp's converter needs sentencepiece: pip install 'lorakit[gguf]'")

from lorakit.data.records import Turn
from lorakit.data.templates import resolve_template
from lorakit.errors import LorakitError
from lorakit.infer.generate import GenerationParams, prompt_ids_for
from lorakit.infer.gguf import export_gguf
from lorakit.infer.gguf_generate import GgufGenerator, GgufStops

SRC = Path(__file__).resolve().parents[2] / "src"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def gguf_model(smollm2_path, tmp_path_factory):
    """A 2-layer random Llama (hidden 64) with smollm2's tokenizer, as in test_export_gguf.py."""
    return build_tiny_smol_model(tmp_path_factory.mktemp("tiny-smol"), smollm2_path)


@pytest.fixture(scope="module")
def exported(gguf_model, shared_home, tmp_path_factory):
    """(adapter folder, GGUF file) of a tiny adapter exported --to gguf --quant f16, once."""
    adapter = make_random_adapter(gguf_model, tmp_path_factory.mktemp("gguf-adapter"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(shared_home))  # llama.cpp's converter, fetched once per machine
        out = tmp_path_factory.mktemp("export") / "out"
        record = export_gguf(adapter, out, quant="f16", verify=False)
    return adapter, out / record["gguf_file"]


@pytest.fixture(scope="module")
def gen(exported):
    g = GgufGenerator(exported[1], n_ctx=512)
    yield g
    g.close()


@pytest.fixture(scope="module")
def lorakit_side(exported, gguf_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_model)
    return resolve_template(adapter=exported[0], tokenizer=tok), tok


CONVERSATIONS = [
    dict(instruction=QUESTION),
    dict(instruction="Summarise the text.", input="The quick brown fox jumps over the lazy dog."),
    dict(instruction="Who are you?", system="You are a helpful assistant."),
    dict(
        instruction="And the capital of Italy?",
        history=[Turn("user", QUESTION), Turn("assistant", "Paris.")],
        system="Answer briefly.",
    ),
]


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["single", "input", "system", "history"])
def test_prompt_ids_are_lorakits(gen, lorakit_side, conv):
    template, tok = lorakit_side
    want = prompt_ids_for(
        template, tok, conv["instruction"], conv.get("input", ""), conv.get("history"), conv.get("system", "")
    )
    got = gen.prompt_ids(conv["instruction"], conv.get("input", ""), conv.get("history"), conv.get("system", ""))
    assert got == want


def test_template_and_stops_come_from_the_export_record(gen, lorakit_side):
    template, tok = lorakit_side
    stops = template.stops(tok)
    assert gen.template.name == template.name and gen.template.kind == template.kind
    assert set(gen.stops.strings) == set(stops.strings)
    assert tok.eos_token_id in gen.stops.token_ids


def test_greedy_answer_is_deterministic_and_has_no_marker(gen):
    params = GenerationParams(max_new_tokens=24)
    answer = gen.generate(QUESTION, params=params)
    assert answer == gen.generate(QUESTION, params=params)
    assert not any(s in answer for s in gen.stops.strings)
    sampled = gen.generate(QUESTION, params=GenerationParams(max_new_tokens=8, temperature=0.8, seed=3))
    assert sampled == gen.generate(QUESTION, params=GenerationParams(max_new_tokens=8, temperature=0.8, seed=3))


def test_a_stop_string_cuts_the_answer_and_is_never_streamed(gen, monkeypatch):
    params = GenerationParams(max_new_tokens=24)
    full = gen.generate(QUESTION, params=params)
    if len(full) < 6:
        pytest.skip(f"the random model's answer is too short to cut: {full!r}")
    marker = full[len(full) // 2 : len(full) // 2 + 3]
    monkeypatch.setattr(gen, "stops", GgufStops(gen.stops.token_ids, gen.stops.strings + (marker,)))
    out = io.StringIO()
    answer = gen.generate(QUESTION, params=params, streamer=gen.streamer(out))
    assert answer == full[: full.find(marker)].strip()
    assert marker not in out.getvalue() and out.getvalue().strip() == answer


def test_without_an_export_record_eos_only(exported, tmp_path):
    alone = tmp_path / exported[1].name
    shutil.copyfile(exported[1], alone)
    g = GgufGenerator(alone, n_ctx=512)
    try:
        assert g.stops.token_ids == (g.llm.token_eos(),)
        assert g.stops.strings == (g.llm._model.token_get_text(g.llm.token_eos()),)
        assert g.generate(QUESTION, params=GenerationParams(max_new_tokens=8)) is not None
    finally:
        g.close()


def test_without_llama_cpp_one_line(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(LorakitError, match=r"^--gguf needs llama.cpp: pip install 'lorakit\[gguf\]'$"):
        GgufGenerator(exported[1])


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_generate_gguf_prints_the_answer(exported, gen):
    params = GenerationParams(max_new_tokens=16)
    result = _cli("generate", "--gguf", str(exported[1]), "--max-new-tokens", "16", QUESTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == gen.generate(QUESTION, params=params)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--adapter", "x", "q"], "error: --gguf runs the GGUF file alone; drop --adapter"),
        (
            ["generate", "--base", "b", "--compare", "q"],
            "error: --gguf runs the GGUF file alone; drop --base, --compare",
        ),
        (["chat", "--adapter", "x"], "error: --gguf runs the GGUF file alone; drop --adapter"),
    ],
)
def test_cli_gguf_with_a_model_option_is_one_line(exported, args, message):
    result = _cli(args[0], "--gguf", str(exported[1]), *args[1:])
    assert result.returncode == 2 and result.stderr.strip() == message, result.stderr


def test_cli_missing_gguf_file_is_one_line(tmp_path):
    result = _cli("generate", "--gguf", str(tmp_path / "none.gguf"), "q")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --gguf: {tmp_path / 'none.gguf'} is not a file"
