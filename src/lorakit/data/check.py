"""`lorakit data check`: what the trainer will see, before any training starts."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .loader import LoadedData
from .templates import PromptTemplate
from .tokenize import ExampleTokenizer


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return 0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[int(rank) - 1]


@dataclass
class DataReport:
    path: str
    format: str
    records: int
    with_input: int
    multi_turn: int
    template: str
    cutoff_len: int
    percentiles: dict[str, int]
    over_cutoff: int
    dropped: int
    trained_token_share: float

    def lines(self) -> list[str]:
        p = self.percentiles
        return [
            f"file: {self.path}",
            f"format: {self.format}",
            f"records: {self.records} ({self.with_input} with input, {self.multi_turn} multi-turn)",
            f"template: {self.template}",
            "tokens per example: " + ", ".join(f"{k} {v}" for k, v in p.items()),
            f"over cutoff_len={self.cutoff_len}: {self.over_cutoff} "
            f"({100 * self.over_cutoff / max(self.records, 1):.1f}%, truncated: their EOS is lost)",
            f"dropped (no answer token within cutoff_len): {self.dropped}",
            f"share of tokens in the loss: {100 * self.trained_token_share:.1f}%",
        ]


def check_data(
    data: LoadedData, tokenizer, template: PromptTemplate, cutoff_len: int, train_on_inputs: bool = False
) -> DataReport:
    if cutoff_len < 1:  # every example would count as over it, and none would train
        raise ConfigError(f"--cutoff-len: {cutoff_len}; must be at least 1")
    encode = ExampleTokenizer(tokenizer, template, cutoff_len, train_on_inputs=train_on_inputs)
    _, stats = encode.map(data.examples)
    lengths = sorted(stats.lengths)
    pcts = {f"p{q}": percentile(lengths, q) for q in (50, 90, 95, 99)}
    pcts["max"] = lengths[-1] if lengths else 0
    return DataReport(
        path=str(data.path),
        format=data.format,
        records=len(data.examples),
        with_input=sum(1 for e in data.examples if e.input),
        multi_turn=sum(1 for e in data.examples if len(e.turns) > 2),
        template=template.name,
        cutoff_len=cutoff_len,
        percentiles=pcts,
        over_cutoff=stats.truncated,
        dropped=stats.dropped,
        trained_token_share=stats.trained_tokens / max(stats.total_tokens, 1),
    )
