"""Chat, Compare and Models logic: one base in memory, adapters by name; the preview; eval and merge."""

import json

import pytest
import yaml
from random_adapter import make_random_adapter

from lorakit.data.records import Turn
from lorakit.errors import LorakitError
from lorakit.infer.generate import GenerationParams, Generator
from lorakit.runfolder import CHECKPOINT_MARKER
from lorakit.ui.evaluation import merge_into_workdir, run_evaluation
from lorakit.ui.inference import ModelSession, adapter_base, adapter_template, speaker_for
from lorakit.ui.preview import TRAINED, preview_record, target_module_choices

GREEDY = GenerationParams(max_new_tokens=8)


@pytest.fixture
def adapters(workdir, tiny_base):
    """Two adapters of the tiny base: a finished lorakit run and a stopped run's checkpoint."""
    one = make_random_adapter(tiny_base, workdir.adapters_dir / "one", seed=1)
    (one / "manifest.json").write_text(json.dumps({"base_model": tiny_base, "training": {"global_steps": 3}}))
    run = workdir.adapters_dir / "two"
    ckpt = make_random_adapter(tiny_base, run / "checkpoint-4", seed=2)
    (ckpt / CHECKPOINT_MARKER).write_text("{}")
    (run / "lorakit_config.yaml").write_text(
        yaml.safe_dump({"base_model": tiny_base, "prompt_template_name": "alpaca_short"})
    )
    return workdir


def test_session_answers_like_lorakit_generate(adapters, tiny_base):
    session = ModelSession()
    base = speaker_for(adapters, None, tiny_base)
    one = speaker_for(adapters, "one", "smollm2-135m")  # the adapter's own base wins
    assert one.base == tiny_base and one.adapter_folder == adapters.adapters_dir / "one"
    tuned = session.answer(one, "What is 2 plus 2?", params=GREEDY)
    reference = Generator(base=tiny_base, adapter=str(adapters.adapters_dir / "one"))
    assert tuned == reference.generate("What is 2 plus 2?", params=GREEDY)
    alpaca = session.template_for(one)
    assert session.answer(base, "What is 2 plus 2?", params=GREEDY, template=alpaca) == reference.generate(
        "What is 2 plus 2?", params=GREEDY, use_adapter=False
    )
    assert session.base == tiny_base and list(session.adapters) == ["one"]


def test_stream_grows_to_the_full_answer_and_keeps_history(adapters, tiny_base):
    session = ModelSession()
    speaker = speaker_for(adapters, "one", tiny_base)
    history = [Turn("user", "Hi"), Turn("assistant", "Hello.")]
    params = GenerationParams(max_new_tokens=12)
    pieces = list(session.stream(speaker, "And now?", history, "You are terse.", params))
    assert pieces and all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))
    assert pieces[-1].strip() == session.answer(speaker, "And now?", history, "You are terse.", params)


def test_stream_reports_errors(adapters, tiny_base):
    session = ModelSession()
    bad = speaker_for(adapters, None, str(adapters.root / "no-such-model"))
    with pytest.raises(LorakitError):
        list(session.stream(bad, "Hi"))


def test_compare_uses_one_template_and_checkpoints_load(adapters, tiny_base):
    session = ModelSession()
    speakers = [
        speaker_for(adapters, None, tiny_base),
        speaker_for(adapters, "one", tiny_base),
        speaker_for(adapters, "two/checkpoint-4", tiny_base),
    ]
    results = list(session.compare(speakers, "Who are you?", params=GREEDY))
    assert [i for i, _, _ in results] == [0, 1, 2]
    assert {name for _, _, name in results} == {"alpaca"}  # the first adapter's (the default)
    assert results[1][1] != results[2][1] or results[0][1] != results[1][1]
    assert sorted(session.adapters) == ["one", "two/checkpoint-4"]
    session.remove("one")
    session.remove("two/checkpoint-4")
    assert session.answer(speakers[0], "Who are you?", params=GREEDY, template="alpaca") == results[0][1]
    with pytest.raises(LorakitError):
        session.remove("one")


def test_checkpoint_knows_its_run(adapters, tiny_base, tiny_tokenizer):
    ckpt = adapters.adapters_dir / "two" / "checkpoint-4"
    assert adapter_base(ckpt) == tiny_base
    assert adapter_template(ckpt, tiny_tokenizer).name == "alpaca_short"


def test_preview_marks_the_trained_part(workdir, tiny_base, alpaca_file):
    segments, line = preview_record(alpaca_file, "alpaca", tiny_base, index=2)
    text = "".join(t for t, _ in segments)
    trained = "".join(t for t, label in segments if label == TRAINED)
    assert "### Instruction:\nWhat is 2 plus 2?" in text and "### Response:" in text
    assert trained == "2 plus 2 is 4.<|im_end|>"  # the answer and its EOS count in the loss
    assert line.startswith("record 3 of 24 (alpaca, template alpaca): ") and "in the loss" in line
    chat, _ = preview_record(alpaca_file, "chat", tiny_base)
    assert any("<|im_start|>assistant" in t for t, label in chat if label is None)
    everything, _ = preview_record(alpaca_file, "alpaca", tiny_base, train_on_inputs=True)
    assert all(label == TRAINED for _, label in everything)
    _, short = preview_record(alpaca_file, "alpaca", tiny_base, cutoff_len=20)
    assert "longer than cutoff_len 20" in short or "fills cutoff_len 20" in short
    with pytest.raises(LorakitError, match="chat"):  # no tokenizer on this machine: says so
        preview_record(alpaca_file, "chat", str(workdir.root / "missing-model"))
    assert target_module_choices(tiny_base)[:4] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert "down_proj" in target_module_choices(str(workdir.root / "missing-model"))


def test_evaluate_and_merge_into_the_workdir(adapters, tiny_base, alpaca_file):
    data = adapters.save_upload(alpaca_file)
    result = run_evaluation(
        adapters, [str(data)], ["one"], None, metrics=["contains", "f1"], limit=2, max_new_tokens=4
    )
    assert result.headers[:2] == ["model", "set"] and "contains" in result.headers
    assert [row[0] for row in result.rows] == ["base", "one"]
    assert result.html.is_file() and result.command.startswith("lorakit eval --data ")
    assert "## Samples" in result.markdown and "## Plots" not in result.markdown
    folder, command = merge_into_workdir(adapters, "one")
    assert folder == adapters.merged_dir / "one-merged" and (folder / "config.json").is_file()
    assert "lorakit merge --adapter" in command
    assert str(folder) in [v for _, v in adapters.base_model_choices()]
    with pytest.raises(LorakitError):
        run_evaluation(adapters, [], ["one"], None)
