"""Tokenize examples and mask the labels: which tokens count in the loss.

Each template segment is tokenized on its own, exactly as inference tokenizes the prompt, so the
prompt tokens the model is trained on are the ones it sees at generation time.

- Prompt tokens get label -100 (not trained) unless ``train_on_inputs``.
- For multi-turn examples only the assistant turns are trained.
- With ``add_eos_token`` an EOS follows every trained answer (unless the template already put
  one there, as chat templates do), so the model learns to stop.
- Examples longer than ``cutoff_len`` are truncated at cutoff_len tokens: the end of the answer
  and its EOS are cut off, so such examples do not teach the model to stop. Examples whose
  prompt alone fills cutoff_len have no trained token left and are dropped. Both are counted
  and reported (``lorakit data check`` shows them before training).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .records import Example
from .templates import PromptTemplate

IGNORE_INDEX = -100


def leading_special_ids(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before a text (BOS for Llama-2 style tokenizers)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(without)
    return list(with_special[:n]) if n > 0 and with_special[n : n + len(without)] == without else []


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt text -> ids, the same way training tokenizes the prompt segment."""
    return leading_special_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    lengths: list[int] = field(default_factory=list)  # before truncation
    trained_tokens: int = 0
    total_tokens: int = 0


class ExampleTokenizer:
    """Example -> {"input_ids", "attention_mask", "labels"} with prompt labels masked."""

    def __init__(
        self,
        tokenizer,
        template: PromptTemplate,
        cutoff_len: int,
        train_on_inputs: bool = False,
        add_eos_token: bool = True,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.cutoff_len = cutoff_len
        self.train_on_inputs = train_on_inputs
        self.add_eos_token = add_eos_token
        self.eos_id = tokenizer.eos_token_id
        self.prefix_ids = leading_special_ids(tokenizer)

    def full_ids(self, example: Example) -> tuple[list[int], list[int]]:
        """Untruncated (input_ids, labels)."""
        ids = list(self.prefix_ids)
        labels = [IGNORE_INDEX] * len(ids)
        for seg in self.template.render(example, self.tokenizer):
            seg_ids = self.tokenizer(seg.text, add_special_tokens=False)["input_ids"]
            if seg.trained and self.add_eos_token and self.eos_id is not None and self.eos_id not in seg_ids:
                seg_ids = seg_ids + [self.eos_id]
            ids += seg_ids
            labels += seg_ids if (seg.trained or self.train_on_inputs) else [IGNORE_INDEX] * len(seg_ids)
        return ids, labels

    def __call__(self, example: Example, stats: TokenizeStats | None = None) -> dict | None:
        """None when nothing is left to train on after truncation (the example is dropped)."""
        ids, labels = self.full_ids(example)
        if stats is not None:
            stats.examples += 1
            stats.lengths.append(len(ids))
        if len(ids) > self.cutoff_len:
            ids, labels = ids[: self.cutoff_len], labels[: self.cutoff_len]
            if stats is not None:
                stats.truncated += 1
        n_trained = sum(1 for x in labels if x != IGNORE_INDEX)
        if n_trained == 0:
            if stats is not None:
                stats.dropped += 1
            return None
        if stats is not None:
            stats.trained_tokens += n_trained
            stats.total_tokens += len(ids)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def map(self, examples: list[Example]) -> tuple[list[dict], TokenizeStats]:
        stats = TokenizeStats()
        features = [f for f in (self(e, stats) for e in examples) if f is not None]
        return features, stats
