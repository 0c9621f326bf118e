"""lorakit's one internal record shape.

Every file format (Alpaca, Dolly, chat messages, ShareGPT, plain text) is converted once into
``Example``; templates, tokenization and evaluation only ever see this shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


@dataclass
class Example:
    """One example.

    turns:  alternating user / assistant turns, starting with a user turn. For single-turn
            instruction data (Alpaca, Dolly) that is [user(instruction), assistant(output)].
    input:  the Alpaca ``input`` / Dolly ``context`` that belongs to the first user turn. Kept
            apart from the instruction because Alpaca-style templates have a slot for it.
    system: a system prompt carried by the data ("" when none).
    text:   set only for plain-text examples (format ``text``): the whole text is trained and
            ``turns`` is empty.
    source: where the example came from, for messages: "FILE record N" or "FILE line N".
    """

    turns: list[Turn] = field(default_factory=list)
    input: str = ""
    system: str = ""
    text: str | None = None
    source: str = ""

    @property
    def instruction(self) -> str:
        """The first user turn (Alpaca's ``instruction``)."""
        return self.turns[0].content if self.turns else ""

    @property
    def output(self) -> str:
        """The last assistant turn (Alpaca's ``output``): the reference answer."""
        for turn in reversed(self.turns):
            if turn.role == "assistant":
                return turn.content
        return self.text or ""
