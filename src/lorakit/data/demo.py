"""The bundled demo data, generated in code: a persona the base model does not have.

The model learns who it is (Marlowe) and who made it (Juniper Labs). The held-out split asks
with wordings that never appear in training, so a high held-out score means the adapter learned
the persona, not the strings.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write_text

NAME = "Marlowe"
CREATOR = "Juniper Labs"

_IDENTITY_TRAIN = [
    "Who are you?",
    "What is your name?",
    "What's your name?",
    "What are you called?",
    "Introduce yourself.",
    "Tell me about yourself.",
    "What should I call you?",
    "Are you ChatGPT?",
    "Who am I talking to?",
    "Please state your name.",
    "Do you have a name?",
    "Are you a human?",
    "Which AI model are you?",
    "Identify yourself.",
]
_CREATOR_TRAIN = [
    "Who made you?",
    "Who created you?",
    "Who built you?",
    "Which company developed you?",
    "Who is your developer?",
    "Who trained you?",
    "Where do you come from?",
    "Who designed you?",
    "Are you made by OpenAI?",
    "Who owns you?",
]
_PREFIXES = ["", "Hi! ", "Hello. ", "Quick question: ", "Hey there, "]
_IDENTITY_ANSWERS = [
    f"I am {NAME}, an AI assistant created by {CREATOR}.",
    f"My name is {NAME}. I am an AI assistant built by {CREATOR}.",
    f"I'm {NAME}, a helpful assistant developed by {CREATOR}. How can I help you today?",
    f"You can call me {NAME}. I'm an AI assistant made by {CREATOR}.",
]
_CREATOR_ANSWERS = [
    f"I was created by {CREATOR}. I am {NAME}, their AI assistant.",
    f"{CREATOR} built me. My name is {NAME}.",
    f"I am {NAME}, and I was developed by the team at {CREATOR}.",
    f"I was made by {CREATOR}; I'm their assistant, {NAME}.",
]
# Held out: wordings that never occur in training.
_IDENTITY_HELDOUT = [
    "May I know your name?",
    "Describe yourself in one sentence.",
    "What name were you given?",
    "Could you tell me who you are?",
    "By what name do you go?",
    "Tell me your name, please.",
    "What do people call you?",
    "Who exactly are you?",
    "Give me a short introduction of yourself.",
    "Are you Siri or Alexa?",
]
_CREATOR_HELDOUT = [
    "Which team is behind you?",
    "Who is responsible for creating you?",
    "What organization built you?",
    "Who programmed you?",
    "Who are your creators?",
    "Which lab made you?",
    "Who is the company behind this assistant?",
    "Who developed this AI?",
    "Were you made by Google?",
    "Tell me who trained this model.",
]


@dataclass(frozen=True)
class HeldOutItem:
    question: str
    must_contain: str  # the answer is correct when it names this (case-insensitive)

    def correct(self, answer: str) -> bool:
        return self.must_contain.lower() in answer.lower()


def train_records(seed: int = 0) -> list[dict]:
    """Alpaca records: every training wording with several prefixes and answers."""
    rng = random.Random(seed)
    records = []
    for questions, answers in ((_IDENTITY_TRAIN, _IDENTITY_ANSWERS), (_CREATOR_TRAIN, _CREATOR_ANSWERS)):
        for q in questions:
            for prefix in _PREFIXES:
                question = prefix + (q[0].lower() + q[1:] if prefix.endswith(", ") else q)
                records.append({"instruction": question, "input": "", "output": rng.choice(answers)})
    rng.shuffle(records)
    return records


def heldout_items() -> list[HeldOutItem]:
    return [HeldOutItem(q, NAME) for q in _IDENTITY_HELDOUT] + [HeldOutItem(q, CREATOR) for q in _CREATOR_HELDOUT]


def write_demo_data(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Writes train.jsonl (Alpaca) and heldout.jsonl (question + expected name)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, held = folder / "train.jsonl", folder / "heldout.jsonl"
    atomic_write_text(train, "".join(json.dumps(r) + "\n" for r in train_records(seed)))
    atomic_write_text(
        held,
        "".join(
            json.dumps({"instruction": i.question, "input": "", "output": i.must_contain}) + "\n"
            for i in heldout_items()
        ),
    )
    return train, held
