"""Templates round-trip, and label masking trains exactly the answer tokens (+ EOS)."""

import json

import pytest

from lorakit.data.records import Example, Turn
from lorakit.data.templates import load_template, template_for_folder, template_from_record
from lorakit.data.tokenize import IGNORE_INDEX, ExampleTokenizer, encode_prompt
from lorakit.errors import ConfigError


def alpaca(instruction, output, input=""):
    return Example(turns=[Turn("user", instruction), Turn("assistant", output)], input=input)


def test_builtin_alpaca_matches_alpaca_lora_text():
    t = load_template("alpaca")
    prompt = t.build_prompt("Say hi", input="to Bob")
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert prompt.endswith("### Instruction:\nSay hi\n\n### Input:\nto Bob\n\n### Response:\n")
    assert load_template("alpaca").build_prompt("Say hi").endswith("### Instruction:\nSay hi\n\n### Response:\n")
    assert load_template("alpaca_legacy").build_prompt("x").endswith("### Response:")
    assert load_template("alpaca_short").build_prompt("x") == "### Instruction:\nx\n\n### Response:\n"


def test_braces_in_user_text_are_safe():
    assert "{not a field}" in load_template("alpaca").build_prompt("keep {not a field}")


def test_user_template_file_and_record_round_trip(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(
        json.dumps(
            {
                "description": "d",
                "prompt_input": "Q: {instruction} [{input}]\nA: ",
                "prompt_no_input": "Q: {instruction}\nA: ",
                "response_split": "A:",
            }
        )
    )
    t = load_template(str(f))
    assert t.name == "mine" and t.build_prompt("hi") == "Q: hi\nA: "
    t.save(tmp_path)
    back = template_for_folder(tmp_path)
    assert back == t
    assert back.extract_response("Q: hi\nA: hello") == "hello"


def test_bad_template_file_names_the_key(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"prompt_input": "{instruction}"}))
    with pytest.raises(ConfigError, match="prompt_no_input"):
        load_template(str(f))
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_template("no-such-template")


def test_alpaca_masking_trains_only_response_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    t = load_template("alpaca")
    enc = ExampleTokenizer(tok, t, cutoff_len=512)
    ex = alpaca("What is the capital of France?", "Paris")
    feat = enc(ex)
    prompt_ids = encode_prompt(tok, t.build_prompt(ex.instruction))
    answer_ids = tok("Paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert feat["input_ids"] == prompt_ids + answer_ids
    assert feat["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    # train_on_inputs: every token counts
    all_on = ExampleTokenizer(tok, t, cutoff_len=512, train_on_inputs=True)(ex)
    assert all_on["labels"] == all_on["input_ids"]
    # no EOS when asked not to
    no_eos = ExampleTokenizer(tok, t, cutoff_len=512, add_eos_token=False)(ex)
    assert no_eos["input_ids"][-1] != tok.eos_token_id


def test_cutoff_truncates_and_drops(tiny_tokenizer):
    t = load_template("alpaca_short")
    cutoff = len(encode_prompt(tiny_tokenizer, t.build_prompt("hi"))) + 3
    enc = ExampleTokenizer(tiny_tokenizer, t, cutoff_len=cutoff)
    from lorakit.data.tokenize import TokenizeStats

    stats = TokenizeStats()
    long_answer = enc(alpaca("hi", "the quick brown fox " * 10), stats)
    assert len(long_answer["input_ids"]) == cutoff and long_answer["labels"][-1] != tiny_tokenizer.eos_token_id
    assert enc(alpaca("the quick brown fox " * 10, "x"), stats) is None  # prompt fills cutoff
    assert (stats.truncated, stats.dropped, stats.examples) == (2, 1, 2)


def test_chat_multi_turn_trains_only_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    t = load_template("chat", tok)
    ex = Example(
        turns=[
            Turn("user", "Who are you?"),
            Turn("assistant", "I am Bob."),
            Turn("user", "Where?"),
            Turn("assistant", "In Paris."),
        ],
        system="Be brief.",
    )
    feat = ExampleTokenizer(tok, t, cutoff_len=512)(ex)
    trained = tok.decode([i for i, lab in zip(feat["input_ids"], feat["labels"]) if lab != IGNORE_INDEX])
    assert trained == "I am Bob.<|im_end|>\nIn Paris.<|im_end|>\n"
    # the whole sequence is the tokenizer's own rendering
    msgs = [{"role": "system", "content": "Be brief."}] + [{"role": x.role, "content": x.content} for x in ex.turns]
    assert tok.decode(feat["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    # chat already ends answers with EOS: no second one
    assert feat["input_ids"].count(tok.eos_token_id) == 5


def test_chat_generation_prompt_matches_training_prefix(tiny_tokenizer):
    t = load_template("chat", tiny_tokenizer)
    p = t.build_prompt("Where?", history=[Turn("user", "Who?"), Turn("assistant", "Bob.")], tokenizer=tiny_tokenizer)
    assert p.endswith("<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n")
    assert template_from_record(t.to_record()) == t


def test_plain_text_is_fully_trained(tiny_tokenizer):
    enc = ExampleTokenizer(tiny_tokenizer, load_template("alpaca"), cutoff_len=512)
    feat = enc(Example(text="The quick brown fox"))
    assert all(lab != IGNORE_INDEX for lab in feat["labels"])
    assert feat["input_ids"][-1] == tiny_tokenizer.eos_token_id


def test_chat_needs_a_chat_template(tiny_tokenizer):
    class NoChat:
        chat_template = None

    with pytest.raises(ConfigError, match="chat template"):
        load_template("chat", NoChat())
