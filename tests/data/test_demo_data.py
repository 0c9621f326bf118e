"""The generated demo data: a persona with a held-out split worded unlike training."""

import json

from lorakit.data.demo import CREATOR, NAME, heldout_items, train_records, write_demo_data
from lorakit.data.loader import load_examples


def _norm(q: str) -> str:
    """Words joined by single spaces and padded, so containment is word-level."""
    return " " + " ".join("".join(ch for ch in q.lower() if ch.isalnum() or ch == " ").split()) + " "


def test_heldout_questions_never_appear_in_training():
    train_questions = {_norm(r["instruction"]) for r in train_records()}
    for item in heldout_items():
        q = _norm(item.question)
        assert all(q not in t and t not in q for t in train_questions), item.question


def test_every_answer_names_the_persona_and_scoring_works():
    for r in train_records():
        assert NAME in r["output"] and CREATOR in r["output"]
    item = heldout_items()[0]
    assert item.correct(f"I'm {NAME.lower()}!") and not item.correct("I am SmolLM, made by Hugging Face.")


def test_written_files_load_as_alpaca(tmp_path):
    train, held = write_demo_data(tmp_path)
    loaded = load_examples(train)
    assert loaded.format == "alpaca" and len(loaded.examples) == len(train_records()) >= 100
    assert len(held.read_text().splitlines()) == len(heldout_items()) == 20
    assert json.loads(held.read_text().splitlines()[0])["output"] in (NAME, CREATOR)
    assert train_records(seed=0) == train_records(seed=0)  # deterministic
