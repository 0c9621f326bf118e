"""The Evaluate and export actions of the page: `lorakit eval` and `lorakit merge`, in-process,
writing into the workdir, each with the command that repeats it from a terminal."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..errors import LorakitError
from .workdir import Workdir, safe_stem

SCORE_KEYS = (
    "contains",
    "exact_match",
    "f1",
    "bleu",
    "rouge_l",
    "loss",
    "perplexity",
    "latency_p50_s",
    "tokens_per_s",
)


@dataclass
class EvalOutcome:
    out_dir: Path
    command: str
    headers: list[str]
    rows: list[list]
    sections: list = field(default_factory=list)  # eval.report.ReportSection: the report as data
    plots: list[Path] = field(default_factory=list)
    html: Path | None = None

    @property
    def markdown(self) -> str:
        """The report's sections but its plots (the page shows those as images)."""
        return "\n".join(s.markdown() for s in self.sections if s.key != "plots")


def run_evaluation(
    workdir: Workdir,
    data_values: list[str],
    adapter_keys: list[str],
    base: str | None,
    metrics: list[str] | None = None,
    limit: int | None = None,
    max_new_tokens: int = 64,
) -> EvalOutcome:
    """`lorakit eval`: the base and each adapter on the chosen sets; report in WORKDIR/eval/<time>."""
    from ..eval.report import read_report_sections
    from ..eval.runner import evaluate

    if not data_values:
        raise LorakitError("eval data: choose at least one file")
    data = [str(workdir.resolve_dataset(v)) for v in data_values]
    adapters = [str(workdir.resolve_adapter(k)) for k in adapter_keys or []]
    if not adapters and not base:
        raise LorakitError("evaluate: choose a base model or at least one adapter")
    limit = int(limit) if limit else None
    stamp = f"eval-{datetime.now():%Y%m%d-%H%M%S}"
    out = workdir.path_for(workdir.eval_dir, stamp, "report name")
    n = 1
    while out.exists():  # two evaluations in one second: never one report folder
        out = workdir.path_for(workdir.eval_dir, f"{stamp}-{n}", "report name")
        n += 1
    result = evaluate(
        base or None, adapters, data, out, metrics=metrics or None, limit=limit, max_new_tokens=int(max_new_tokens)
    )
    argv = ["lorakit", "eval"] + [x for d in data for x in ("--data", d)] + ["--out", str(out)]
    argv += [x for a in adapters for x in ("--adapter", a)]
    if base:
        argv += ["--base", base]
    if metrics:
        argv += ["--metrics", ",".join(metrics)]
    if limit:
        argv += ["--limit", str(limit)]
    argv += ["--max-new-tokens", str(int(max_new_tokens))]

    present = [
        k for k in SCORE_KEYS if any(k in row for per_set in result["scores"].values() for row in per_set.values())
    ]
    rows = []
    for model, per_set in result["scores"].items():
        for set_name, row in per_set.items():
            rows.append([model, set_name] + [_cell(row.get(k)) for k in present])
    sections = read_report_sections(out)
    plots = [out / name for s in sections for name in s.plots]
    return EvalOutcome(
        out_dir=out,
        command=shlex.join(argv),
        headers=["model", "set"] + present,
        rows=rows,
        sections=sections,
        plots=plots,
        html=out / "report.html",
    )


def _cell(v):
    return round(v, 4) if isinstance(v, float) else ("" if v is None else v)


def merge_into_workdir(
    workdir: Workdir, adapter_key: str, name: str = "", dtype: str = "fp32", base: str | None = None
) -> tuple[Path, str]:
    """`lorakit merge`: the adapter merged into its base, as WORKDIR/merged/NAME (a standalone
    model folder). Returns (folder, the command that repeats it)."""
    from ..infer.merge import merge_adapter
    from .inference import adapter_base

    folder = workdir.resolve_adapter(adapter_key)
    if not (name or "").strip():
        name = safe_stem(adapter_key.replace("/", "-"), "adapter") + "-merged"
    out = workdir.path_for(workdir.merged_dir, name, "merged model name")
    base = base or adapter_base(folder)
    path = merge_adapter(folder, out, base=base, dtype=dtype)
    argv = ["lorakit", "merge", "--adapter", str(folder), "--out", str(out), "--dtype", dtype]
    if base:
        argv += ["--base", base]
    return path, shlex.join(argv)
