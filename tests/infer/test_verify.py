"""Export verification (lorakit.infer.verify): which prompts an export is checked on, lorakit's own
reference answers and log-probs on the tiny random Llama, the figures of compare() checked by hand on
a tiny vocabulary, and the rule of gate() for every kind."""

import json
import math
import shutil

import pytest
import torch
from random_adapter import make_random_adapter
from transformers import AutoTokenizer

from lorakit.config import TrainConfig, dump_config, split_validation, val_count
from lorakit.data.loader import load_examples
from lorakit.data.records import Turn
from lorakit.errors import LorakitError
from lorakit.infer.generate import Generator, prompt_ids_for
from lorakit.infer.verify import (
    FIXED_PROMPTS,
    THRESHOLDS,
    Conversation,
    Reference,
    VerificationFailed,
    VerifySet,
    compare,
    describe,
    gate,
    lorakit_reference,
    reference_nll,
    teacher_forced_logprobs,
    verification_set,
)
from lorakit.runfolder import CONFIG_RECORD

N_RECORDS = 20


# ---- helpers -----------------------------------------------------------------------------------


def write_alpaca(path, n=N_RECORDS, tag="train"):
    """n Alpaca records whose instructions and answers say which record they are."""
    records = [
        {
            "instruction": f"{tag} instruction {i}",
            "input": f"{tag} input {i}" if i % 3 == 0 else "",
            "output": f"{tag} answer {i}",
        }
        for i in range(n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_run(run, **config):
    """A run folder with the config record the trainer writes (recipe.py: dump_config -> CONFIG_RECORD)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / CONFIG_RECORD).write_text(dump_config(TrainConfig(**config)), encoding="utf-8")
    return run


def instructions(vset):
    return [c.instruction for c in vset.prompts]


def held_out(data_path, val_set_size, seed):
    """The validation examples training holds out, computed the way the trainer does (recipe.setup_data)."""
    examples = load_examples(data_path).examples
    val, _ = split_validation(examples, val_count(val_set_size, len(examples)), seed)
    return val


# ---- 1. the prompts ----------------------------------------------------------------------------


def test_verify_data_wins_and_takes_at_most_n(tmp_path):
    train = write_alpaca(tmp_path / "train.json")
    verify = write_alpaca(tmp_path / "verify.json", n=10, tag="verify")
    run = write_run(tmp_path / "run", data_path=str(train), val_set_size=5, seed=7)
    vset = verification_set(run, data=verify, n=4)
    assert instructions(vset) == [f"verify instruction {i}" for i in range(4)]
    assert [c.output for c in vset.prompts] == [f"verify answer {i}" for i in range(4)]
    assert vset.prompts[0].input == "verify input 0" and vset.prompts[1].input == ""
    assert vset.source == f"--verify-data {verify}"
    # fewer records than n: all of them
    assert len(verification_set(run, data=verify, n=50).prompts) == 10


def test_verify_data_without_instruction_records_names_the_option(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"plain text {i}"}) for i in range(3)), encoding="utf-8")
    with pytest.raises(LorakitError, match="--verify-data") as info:
        verification_set(tmp_path, data=text)
    assert str(text) in str(info.value)


def test_verify_prompts_below_one_is_an_error(tmp_path):
    with pytest.raises(LorakitError, match="--verify-prompts"):
        verification_set(tmp_path, n=0)


@pytest.mark.parametrize("val_set_size", [5, 0.25], ids=["count", "fraction"])
def test_validation_split_is_what_training_held_out(tmp_path, val_set_size):
    train = write_alpaca(tmp_path / "train.json")
    run = write_run(tmp_path / "run", data_path=str(train), val_set_size=val_set_size, seed=7)
    val = held_out(train, val_set_size, 7)
    assert len(val) == 5
    # the test can tell: not the first records, and not the default seed's split either
    assert [e.instruction for e in val] != [f"train instruction {i}" for i in range(5)]
    assert [e.instruction for e in val] != [e.instruction for e in held_out(train, val_set_size, 42)]

    vset = verification_set(run, n=32)
    assert instructions(vset) == [e.instruction for e in val]
    assert [c.output for c in vset.prompts] == [e.output for e in val]
    assert [c.input for c in vset.prompts] == [e.input for e in val]
    assert vset.source.startswith(f"validation split of {train}") and str(val_set_size) in vset.source
    # n caps it, in the split's order
    assert instructions(verification_set(run, n=3)) == [e.instruction for e in val[:3]]


def test_validation_split_wins_over_eval_data(tmp_path):
    train = write_alpaca(tmp_path / "train.json")
    evald = write_alpaca(tmp_path / "eval.json", n=4, tag="eval")
    run = write_run(tmp_path / "run", data_path=str(train), val_set_size=3, seed=1, eval_data_path=[str(evald)])
    assert instructions(verification_set(run)) == [e.instruction for e in held_out(train, 3, 1)]


def test_eval_data_when_no_validation_split(tmp_path):
    train = write_alpaca(tmp_path / "train.json")
    evald = write_alpaca(tmp_path / "eval.json", n=6, tag="eval")
    run = write_run(tmp_path / "run", data_path=str(train), val_set_size=0, eval_data_path=str(evald))
    vset = verification_set(run, n=4)
    assert instructions(vset) == [f"eval instruction {i}" for i in range(4)]
    assert [c.output for c in vset.prompts] == [f"eval answer {i}" for i in range(4)]
    assert vset.source == f"eval data {evald}"
    # an unreadable eval file is skipped for the next one
    run2 = write_run(
        tmp_path / "run2", data_path=str(train), eval_data_path=[str(tmp_path / "missing.json"), str(evald)]
    )
    assert verification_set(run2, n=2).source == f"eval data {evald}"
    # eval data also serves when the training data cannot be read
    run3 = write_run(tmp_path / "run3", data_path=str(tmp_path / "gone.json"), eval_data_path=[str(evald)])
    assert instructions(verification_set(run3, n=1)) == ["eval instruction 0"]


def test_first_training_prompts_when_no_split_and_no_eval_data(tmp_path):
    train = write_alpaca(tmp_path / "train.json")
    run = write_run(tmp_path / "run", data_path=str(train), val_set_size=0)
    vset = verification_set(run, n=5)
    assert instructions(vset) == [f"train instruction {i}" for i in range(5)]
    assert [c.output for c in vset.prompts] == [f"train answer {i}" for i in range(5)]
    assert vset.source == f"first training prompts of {train}"


def _fixed_expected(n):
    return [Conversation(q, input=i) for q, i in FIXED_PROMPTS][:n]


@pytest.mark.parametrize("kind", ["missing", "corrupt", "text-only", "no-record"])
def test_fixed_prompts_when_the_data_cannot_be_read(tmp_path, kind):
    data = tmp_path / "train.json"
    if kind == "corrupt":
        data.write_text("[{not json", encoding="utf-8")
    elif kind == "text-only":
        data.write_text(json.dumps([{"text": "just text"}] * 5), encoding="utf-8")
    run = tmp_path / "run"
    if kind == "no-record":
        run.mkdir()
    else:
        write_run(run, data_path=str(data), val_set_size=2)
    vset = verification_set(run, n=3)
    assert vset.prompts == _fixed_expected(3)
    assert "fixed prompts" in vset.source and "could not be read" in vset.source
    assert len(verification_set(run, n=100).prompts) == len(FIXED_PROMPTS)


def test_checkpoint_uses_its_runs_config(tmp_path):
    train = write_alpaca(tmp_path / "train.json")
    run = write_run(tmp_path / "run", data_path=str(train), val_set_size=4, seed=3)
    checkpoint = run / "checkpoint-10"
    checkpoint.mkdir()
    vset = verification_set(checkpoint)
    assert instructions(vset) == [e.instruction for e in held_out(train, 4, 3)]
    assert vset.source.startswith("validation split of")


def test_relative_data_path_found_from_another_working_directory(tmp_path, monkeypatch):
    start = tmp_path / "project"  # where `lorakit train` was run
    train = write_alpaca(start / "data" / "train.json")
    evald = write_alpaca(start / "data" / "eval.json", n=3, tag="eval")
    run = write_run(start / "runs" / "a", data_path="data/train.json", val_set_size=4, seed=5, output_dir="runs/a")
    run_eval = write_run(
        start / "runs" / "b", data_path="data/train.json", eval_data_path="data/eval.json", output_dir="runs/b"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert not (elsewhere / "data" / "train.json").exists()

    vset = verification_set(run)
    assert instructions(vset) == [e.instruction for e in held_out(train, 4, 5)]
    assert str(train.resolve()) in vset.source
    # the checkpoint of such a run too, and a relative eval_data_path
    assert instructions(verification_set(run / "checkpoint-2")) == instructions(vset)
    vset_eval = verification_set(run_eval)
    assert instructions(vset_eval) == ["eval instruction 0", "eval instruction 1", "eval instruction 2"]
    assert vset_eval.source == f"eval data {evald.resolve()}"


def test_conversations_from_records(tmp_path):
    chat = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "a2"},
            ]
        },
        {"messages": [{"role": "user", "content": "only"}, {"role": "assistant", "content": "one"}]},
    ]
    chat.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    first, second = verification_set(tmp_path, data=chat).prompts
    assert first == Conversation(
        "u2", input="", history=(Turn("user", "u1"), Turn("assistant", "a1")), system="Be brief.", output="a2"
    )
    assert second == Conversation("only", output="one")

    alpaca = tmp_path / "alpaca.json"
    records = [
        {"instruction": "Sum", "input": "1 2", "output": "3"},
        {"instruction": "And now?", "input": "4 5", "output": "9", "history": [["Sum 1 2", "3"]]},
    ]
    alpaca.write_text(json.dumps(records), encoding="utf-8")
    plain, with_history = verification_set(tmp_path, data=alpaca).prompts
    assert plain == Conversation("Sum", input="1 2", output="3")
    # the loader folds the input into the last instruction when there is history
    assert with_history == Conversation(
        "And now?\n\n4 5", history=(Turn("user", "Sum 1 2"), Turn("assistant", "3")), output="9"
    )


# ---- 2. the figures ----------------------------------------------------------------------------


def make_reference(logprobs, answer_ids, answers=None, prompts=None):
    n = len(answer_ids)
    prompts = prompts or [Conversation(f"prompt {i}") for i in range(n)]
    return Reference(
        vset=VerifySet(prompts, "hand-made"),
        prompt_ids=[[1, 2]] * n,
        answers=answers or [f"answer {i}" for i in range(n)],
        answer_ids=answer_ids,
        logprobs=logprobs,
        tokens_per_s=12.34,
        template=None,
        tokenizer=None,
        label="hand-made reference",
        new_tokens=4,
    )


# two positions on a vocab of 2: p1 = (0.75, 0.25) -> token 0, p2 = (0.2, 0.8) -> token 1
P = torch.tensor([[0.75, 0.25], [0.2, 0.8]])


def test_compare_identical_logits():
    ref = make_reference([P.log()], [[0, 1]])
    figures = compare(ref, list(ref.answers), [P.log() + 3.0], tokens_per_s=5.0)  # logits: any offset
    assert figures["top1_agreement"] == 1.0
    assert figures["mean_kl"] == pytest.approx(0.0, abs=1e-6) and figures["max_kl"] == pytest.approx(0.0, abs=1e-6)
    assert figures["greedy_identical"] == 1 and figures["greedy_identical_share"] == 1.0
    assert figures["tokens_compared"] == 2 and figures["differences"] == []
    assert figures["prompts"] == 1 and figures["prompts_source"] == "hand-made"
    assert figures["reference"] == "hand-made reference" and figures["max_new_tokens"] == 4
    assert figures["tokens_per_s"] == 5.0 and figures["reference_tokens_per_s"] == 12.3


def test_compare_perturbed_candidate_by_hand():
    ref = make_reference([P.log()], [[0, 1]])
    # the candidate swaps the first position's probabilities (now ranks token 1 first), keeps the second
    q = torch.tensor([[0.25, 0.75], [0.2, 0.8]])
    logits = q.log() + torch.tensor([[1.0], [-2.0]])  # raw logits: a different offset per row
    figures = compare(ref, list(ref.answers), [logits])
    kl1 = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)  # = 0.5 ln 3
    assert figures["top1_agreement"] == 0.5
    assert figures["mean_kl"] == pytest.approx(kl1 / 2, abs=1e-6)
    assert figures["max_kl"] == pytest.approx(kl1, abs=1e-6)
    assert figures["mean_kl"] > 0
    assert "tokens_per_s" not in figures


def test_compare_kl_is_lorakit_to_export():
    # KL(p || q) is not symmetric: the reference's distribution weighs the log ratio
    ref = make_reference([torch.tensor([[0.9, 0.1]]).log()], [[0]])
    q = torch.tensor([[0.6, 0.4]])
    expected = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    reverse = 0.6 * math.log(0.6 / 0.9) + 0.4 * math.log(0.4 / 0.1)
    assert abs(expected - reverse) > 0.05
    figures = compare(ref, list(ref.answers), [q.log()])
    assert figures["mean_kl"] == pytest.approx(expected, abs=1e-6)
    assert figures["top1_agreement"] == 1.0


def test_compare_padded_candidate_vocab():
    ref = make_reference([P.log()], [[0, 1]])
    # a GGUF's padded vocab: columns beyond the reference's vocab, here with the largest logits
    padded = torch.cat([P.log(), torch.full((2, 3), 50.0)], dim=-1)
    figures = compare(ref, list(ref.answers), [padded])
    assert figures["top1_agreement"] == 1.0
    assert figures["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    # extra rows (the export read past the answer) are ignored too
    longer = torch.cat([P.log(), torch.tensor([[0.0, 9.0]])])
    assert compare(ref, list(ref.answers), [longer])["top1_agreement"] == 1.0


def test_compare_counts_texts_and_positions_over_prompts():
    lp = [P.log(), P[:1].log(), torch.zeros((0, 1))]  # the third answer is empty: nothing to compare
    ref = make_reference(lp, [[0, 1], [0], []], answers=["same", "lorakit says", "x" * 3])
    long_prompt = "p" * 100
    ref.vset.prompts[1] = Conversation(long_prompt)
    got_logits = [P.log(), torch.tensor([[0.1, 0.9]]).log(), torch.zeros((0, 2))]
    figures = compare(ref, ["same", "export says", "xxx"], got_logits)
    assert figures["greedy_identical"] == 2 and figures["greedy_identical_share"] == round(2 / 3, 4)
    assert figures["tokens_compared"] == 3
    assert figures["top1_agreement"] == round(2 / 3, 4)
    kl = 0.75 * math.log(0.75 / 0.1) + 0.25 * math.log(0.25 / 0.9)
    assert figures["mean_kl"] == pytest.approx(kl / 3, abs=1e-6)
    assert figures["differences"] == [{"prompt": "p" * 80, "lorakit": "lorakit says", "export": "export says"}]


def test_compare_lists_at_most_eight_differences():
    n = 10
    ref = make_reference([P.log()] * n, [[0, 1]] * n)
    figures = compare(ref, ["other"] * n, [P.log()] * n)
    assert figures["greedy_identical"] == 0 and figures["greedy_identical_share"] == 0.0
    assert len(figures["differences"]) == 8
    assert figures["differences"][0] == {"prompt": "prompt 0", "lorakit": "answer 0", "export": "other"}


# ---- 3. the rule -------------------------------------------------------------------------------


def figures_for(share, top1, prompts=20):
    return {
        "prompts": prompts,
        "prompts_source": "hand-made",
        "greedy_identical": round(share * prompts),
        "greedy_identical_share": share,
        "top1_agreement": top1,
        "mean_kl": 0.01,
        "tokens_compared": 100,
    }


def test_thresholds_table():
    assert THRESHOLDS["hf"] == THRESHOLDS["f16"] == THRESHOLDS["bf16"] == (0.95, 0.99)
    assert THRESHOLDS["q8_0"] == (None, 0.97)
    assert THRESHOLDS["q4_k_m"] == (None, None)


@pytest.mark.parametrize("kind", ["hf", "f16", "bf16"])
def test_gate_float_kinds(kind):
    passed = gate(figures_for(0.95, 0.99), kind)  # exactly at both boundaries
    assert passed["passed"] is True
    assert passed["min_greedy_identical_share"] == 0.95 and passed["min_top1_agreement"] == 0.99
    with pytest.raises(VerificationFailed, match="greedy answers identical 18/20") as info:
        gate(figures_for(0.9, 1.0), kind)
    assert info.value.figures["passed"] is False and info.value.exit_code == 1
    assert kind in str(info.value)
    with pytest.raises(VerificationFailed, match="top-1 agreement") as info:
        gate(figures_for(1.0, 0.9899), kind)
    assert info.value.figures["passed"] is False and info.value.exit_code == 1


def test_gate_q8_0():
    assert gate(figures_for(0.0, 0.97), "q8_0")["passed"] is True  # identical answers are not a rule
    with pytest.raises(VerificationFailed) as info:
        gate(figures_for(1.0, 0.9699), "q8_0")
    assert info.value.figures["passed"] is False and info.value.figures["min_top1_agreement"] == 0.97


@pytest.mark.parametrize("kind", ["q4_k_m", "q5_k_m", "q6_k"])
def test_gate_k_quants_report_only_unless_min_top1(kind):
    figures = gate(figures_for(0.0, 0.1), kind)
    assert figures["passed"] is True and figures["min_top1_agreement"] is None
    assert gate(figures_for(0.0, 0.5), kind, min_top1=0.5)["passed"] is True
    with pytest.raises(VerificationFailed) as info:
        gate(figures_for(0.0, 0.4999), kind, min_top1=0.5)
    assert info.value.figures["passed"] is False and info.value.figures["min_top1_agreement"] == 0.5


def test_min_top1_overrides_the_top1_rule_of_any_kind():
    # looser than hf's 0.99: passes (the identical-answer rule still stands)
    assert gate(figures_for(1.0, 0.6), "hf", min_top1=0.5)["passed"] is True
    with pytest.raises(VerificationFailed, match="greedy answers identical"):
        gate(figures_for(0.5, 1.0), "hf", min_top1=0.5)
    # stricter than q8_0's 0.97: fails
    with pytest.raises(VerificationFailed, match="top-1 agreement"):
        gate(figures_for(1.0, 0.98), "q8_0", min_top1=0.99)


@pytest.mark.parametrize("bad", [-0.01, 1.01, 97.0])
def test_min_top1_outside_zero_one_is_an_error(bad):
    with pytest.raises(LorakitError, match="--min-top1") as info:
        gate(figures_for(1.0, 1.0), "q4_k_m", min_top1=bad)
    assert not isinstance(info.value, VerificationFailed)


def test_gate_on_compare_figures_and_describe():
    ref = make_reference([P.log()], [[0, 1]])
    figures = gate(compare(ref, list(ref.answers), [P.log()], tokens_per_s=7.0), "hf")
    line = describe(figures)
    assert "greedy answers identical 1/1" in line and "top-1 agreement 100.00% of 2 tokens" in line
    assert "7.0 tokens/s" in line and "(hand-made)" in line
    assert describe(None) == "not verified"
    assert describe({"error": "no llama.cpp"}) == "no llama.cpp"


def test_gate_judges_the_unrounded_agreement():
    n, agree = 100_000, 98_996
    lp = torch.log_softmax(torch.tensor([[2.0, 0.0]]), -1).repeat(n, 1)
    candidate = lp.clone()
    candidate[: n - agree] = candidate[: n - agree].flip(-1)
    ref = make_reference([lp], [[0] * n])
    figures = compare(ref, list(ref.answers), [candidate])
    assert figures["tokens_compared"] == n
    with pytest.raises(VerificationFailed):
        gate(figures, "hf")


def test_compare_zero_probability_in_the_reference():
    ref = make_reference([torch.tensor([[1.0, 0.0]]).log()], [[0]])
    q = torch.tensor([[0.5, 0.5]])
    figures = compare(ref, list(ref.answers), [q.log()])
    assert figures["mean_kl"] == pytest.approx(math.log(2), abs=1e-6)
    assert figures["max_kl"] == pytest.approx(math.log(2), abs=1e-6)


# ---- 4. the reference on the tiny model --------------------------------------------------------

NEW_TOKENS = 8
REFERENCE_PROMPTS = [
    Conversation("Who are you?"),
    Conversation(
        "And France?",
        history=(Turn("user", "What is 2 plus 2?"), Turn("assistant", "4")),
        system="Be brief.",
        output="Paris",
    ),
]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("verify-adapter"))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter):
    return lorakit_reference(adapter, str(tiny_model_dir), VerifySet(list(REFERENCE_PROMPTS), "t"), NEW_TOKENS)


@pytest.fixture(scope="module")
def generator(tiny_model_dir, adapter):
    return Generator(base=str(tiny_model_dir), adapter=str(adapter))


def test_reference_rows_are_greedy_answer_positions(reference, tiny_tokenizer):
    assert reference.label.startswith("lorakit Generator") and "fp32" in reference.label
    assert reference.new_tokens == NEW_TOKENS and reference.tokens_per_s > 0
    assert len(reference.answer_ids) == len(reference.logprobs) == len(REFERENCE_PROMPTS)
    for c, prompt, ids, lp in zip(REFERENCE_PROMPTS, reference.prompt_ids, reference.answer_ids, reference.logprobs):
        assert prompt == prompt_ids_for(
            reference.template, reference.tokenizer, c.instruction, c.input, list(c.history), c.system
        )
        # the random model does not stop on its own: the answer is all its new tokens
        assert tiny_tokenizer.eos_token_id not in ids and len(ids) == NEW_TOKENS
        assert lp.dtype == torch.float32 and lp.shape == (len(ids), len(tiny_tokenizer))
        assert torch.allclose(lp.exp().sum(-1), torch.ones(len(ids)), atol=1e-4)
        assert lp.argmax(-1).tolist() == ids  # greedy consistency at every position


def test_reference_answer_ends_at_a_generated_stop_id(reference, adapter, tiny_model_dir, tmp_path):
    """The same model, whose tokenizer's EOS is a token it generates greedily at position k: the
    answer is cut there, stop id included, and row k of the log-probs predicts the stop."""
    stream = reference.answer_ids[0]
    specials = set(reference.tokenizer.all_special_ids)
    k = next(i for i in range(2, len(stream)) if stream[i] not in stream[:i] and stream[i] not in specials)
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.eos_token = tok.convert_ids_to_tokens(stream[k])
    tok.save_pretrained(model)

    stopped = lorakit_reference(adapter, str(model), VerifySet([REFERENCE_PROMPTS[0]], "t"), NEW_TOKENS)
    assert stopped.tokenizer.eos_token_id == stream[k]
    assert stopped.prompt_ids[0] == reference.prompt_ids[0]
    assert stopped.answer_ids[0] == stream[: k + 1]
    assert stopped.logprobs[0].shape[0] == k + 1
    assert stopped.logprobs[0].argmax(-1).tolist() == stream[: k + 1]


def test_teacher_forced_logprobs_rows(generator, reference):
    prompt, answer = reference.prompt_ids[0], reference.answer_ids[0]
    lp = teacher_forced_logprobs(generator.model, prompt, answer[:3])
    assert lp.shape[0] == 3 and lp.argmax(-1).tolist() == answer[:3]
    # teacher forcing: the rows of a prefix are the rows of the whole answer
    assert torch.allclose(lp, reference.logprobs[0][:3], atol=1e-4)
    assert teacher_forced_logprobs(generator.model, prompt, []).shape[0] == 0


def test_reference_nll(generator):
    vset = VerifySet([REFERENCE_PROMPTS[0], REFERENCE_PROMPTS[1], Conversation("Q", output="1 2 3")], "t")
    nll, tokens = reference_nll(generator.model, generator.tokenizer, generator.template, vset)
    assert nll is not None and math.isfinite(nll) and nll > 0
    # the data's answer then EOS, after lorakit's prompt: the mean of teacher-forced -log p
    tok = generator.tokenizer
    total, count = 0.0, 0
    for c in vset.prompts:
        if not c.output:
            continue
        answer = tok(c.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        lp = teacher_forced_logprobs(
            generator.model, generator.prompt_ids(c.instruction, c.input, list(c.history), c.system), answer
        )
        total -= float(lp[torch.arange(len(answer)), torch.tensor(answer)].sum())
        count += len(answer)
    assert tokens == count
    assert nll == pytest.approx(total / count, rel=1e-4)
    assert reference_nll(generator.model, tok, generator.template, VerifySet([Conversation("no answer")], "t")) == (
        None,
        0,
    )
