"""Evaluation reports: report.json, report.md, report.html and PNG plots from an evaluation result.

The result dict (built by the evaluator) holds "created", "base", "models" (base first, then each
adapter, with its train_log records), "datasets", "scores" (model -> dataset -> metric -> value)
and "samples" (dataset -> [{prompt, reference, answers: {model: text}}]). Metric keys may be
missing and values may be None. Every file is written to a temporary name then moved into place,
all of them together, so an interrupted run or a full disk never leaves a half-written file or a
report mixed from two runs.

report.md and report.html are both rendered from report_sections(): the report as a list of
sections (Metrics, Efficiency, Plots, Samples), each with its tables and plot files, which the UI
shows as they are (read_report_sections reads them back from a report folder)."""

from __future__ import annotations

import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_write_files
from ..runfolder import EVAL_REPORT, read_eval_report

# Quality metrics in display order; other unknown non-efficiency keys are appended after these.
QUALITY_METRICS = ["loss", "perplexity", "exact_match", "f1", "bleu", "rouge_l", "contains"]
EFFICIENCY_METRICS = ["latency_p50_s", "latency_p95_s", "tokens_per_s", "peak_memory_mib"]
# Metrics on a 0-100 scale, plotted together in metrics.png (loss/perplexity have other scales).
PERCENT_METRICS = ["exact_match", "f1", "bleu", "rouge_l", "contains"]
METRIC_LABELS = {
    "loss": "Loss",
    "perplexity": "Perplexity",
    "exact_match": "Exact match",
    "f1": "F1",
    "bleu": "BLEU",
    "rouge_l": "ROUGE-L",
    "contains": "Contains",
    "latency_p50_s": "Latency p50 (s)",
    "latency_p95_s": "Latency p95 (s)",
    "tokens_per_s": "Tokens/s",
    "peak_memory_mib": "Peak memory (MiB)",
}
EFFICIENCY_HEADERS = [
    "Model",
    "Dataset",
    "Latency p50 (s)",
    "Latency p95 (s)",
    "Tokens/s",
    "Peak memory (MiB)",
    "Adapter size (MiB)",
    "Trainable params",
]
PLOTS = {"metrics": "metrics.png", "loss_curves": "loss_curves.png", "latency": "latency.png"}
MAX_CELL = 300
MISSING = "–"


# ---- small helpers -----------------------------------------------------------------------------


def _number(v) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / inf values."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(v, decimals: int = 2) -> str:
    n = _number(v)
    if n is not None:
        return f"{n:.{decimals}f}"
    return MISSING if v is None else str(v)


def _fmt_int(v) -> str:
    n = _number(v)
    return f"{int(n):,}" if n is not None else MISSING


def _mib(v) -> str:
    n = _number(v)
    return f"{n / 2**20:.2f}" if n is not None else MISSING


def _truncate(text, limit: int = MAX_CELL) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


def _md_cell(text) -> str:
    """Escape for a markdown table cell: HTML specials, pipes and newlines."""
    text = html.escape(str(text), quote=False).replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def _html_cell(text) -> str:
    return html.escape(str(text)).replace("\r\n", "\n").replace("\n", "<br>")


def _jsonable(obj):
    """JSON has no NaN/inf: those become None; paths and other objects become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


# ---- reading the result ------------------------------------------------------------------------


def _model_names(result: dict) -> list[str]:
    names = [str(m.get("name")) for m in result.get("models") or []]
    for name in result.get("scores") or {}:
        if name not in names:
            names.append(name)
    return names


def _dataset_names(result: dict) -> list[str]:
    names = [str(d.get("name")) for d in result.get("datasets") or []]
    for per_ds in (result.get("scores") or {}).values():
        for ds in per_ds or {}:
            if ds not in names:
                names.append(ds)
    for ds in result.get("samples") or {}:
        if ds not in names:
            names.append(ds)
    return names


def _score(result: dict, model: str, dataset: str) -> dict:
    return ((result.get("scores") or {}).get(model) or {}).get(dataset) or {}


def _quality_metrics(result: dict, dataset: str) -> list[str]:
    present: list[str] = []
    for model in _model_names(result):
        for k in _score(result, model, dataset):
            if k not in EFFICIENCY_METRICS and k not in present:
                present.append(k)
    known = [k for k in QUALITY_METRICS if k in present]
    return known + [k for k in present if k not in QUALITY_METRICS]


def _tables(result: dict) -> dict:
    """Header + rows of every table, as plain (unescaped) strings."""
    models = _model_names(result)
    datasets = _dataset_names(result)
    info = {str(m.get("name")): m for m in result.get("models") or []}

    metrics = {}
    for ds in datasets:
        keys = _quality_metrics(result, ds)
        if not keys:
            continue
        header = ["Model"] + [METRIC_LABELS.get(k, k) for k in keys]
        rows = [[m] + [_fmt(_score(result, m, ds).get(k)) for k in keys] for m in models]
        metrics[ds] = (header, rows)

    eff_rows = []
    for m in models:
        mi = info.get(m, {})
        for ds in datasets:
            s = _score(result, m, ds)
            if not s:
                continue
            eff_rows.append(
                [m, ds]
                + [_fmt(s.get(k)) for k in EFFICIENCY_METRICS]
                + [_mib(mi.get("adapter_size_bytes")), _fmt_int(mi.get("trainable_params"))]
            )

    samples = {}
    for ds in datasets:
        items = (result.get("samples") or {}).get(ds) or []
        if not items:
            continue
        answer_models = list(models)
        for it in items:
            for name in it.get("answers") or {}:
                if name not in answer_models:
                    answer_models.append(name)
        header = ["#", "Prompt", "Reference"] + answer_models
        rows = []
        for i, it in enumerate(items, 1):
            answers = it.get("answers") or {}
            rows.append(
                [str(i), _truncate(it.get("prompt")), _truncate(it.get("reference"))]
                + [_truncate(answers.get(name)) for name in answer_models]
            )
        samples[ds] = (header, rows)

    return {"metrics": metrics, "efficiency": (EFFICIENCY_HEADERS, eff_rows), "samples": samples}


# ---- plots -------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    # Figure + Agg canvas directly: headless, and leaves pyplot's global state alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")


def _plot_metrics(result: dict) -> bytes | None:
    models = _model_names(result)
    panels = []
    for ds in _dataset_names(result):
        keys = _quality_metrics(result, ds)
        percent = [k for k in keys if k in PERCENT_METRICS]
        keys = percent or keys  # prefer the 0-100 metrics; mixing in loss would squash them
        series = {m: [_number(_score(result, m, ds).get(k)) for k in keys] for m in models}
        if any(v is not None for vals in series.values() for v in vals):
            panels.append((ds, keys, series))
    if not panels:
        return None
    fig = _figure(max(6.0, 5.0 * len(panels)), 4.5)
    for i, (ds, keys, series) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        _grouped_bars(ax, [METRIC_LABELS.get(k, k) for k in keys], series)
        ax.set_title(ds)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    return _png(fig)


def _plot_loss_curves(result: dict) -> bytes | None:
    curves = []
    for m in result.get("models") or []:
        log = m.get("train_log") or []
        train = [(r.get("step"), _number(r.get("loss"))) for r in log]
        evals = [(r.get("step"), _number(r.get("eval_loss"))) for r in log]
        train = [(s, v) for s, v in train if _number(s) is not None and v is not None]
        evals = [(s, v) for s, v in evals if _number(s) is not None and v is not None]
        if train or evals:
            curves.append((str(m.get("name")), train, evals))
    if not curves:
        return None
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for name, train, evals in curves:
        color = None
        if train:
            (line,) = ax.plot(*zip(*train), label=f"{name} train loss")
            color = line.get_color()
        if evals:
            ax.plot(*zip(*evals), marker="o", linestyle="--", color=color, label=f"{name} eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def _plot_latency(result: dict) -> bytes | None:
    models = _model_names(result)
    panels = []
    for ds in _dataset_names(result):
        series = {
            METRIC_LABELS[k]: [_number(_score(result, m, ds).get(k)) for m in models]
            for k in ("latency_p50_s", "latency_p95_s")
        }
        if any(v is not None for vals in series.values() for v in vals):
            panels.append((ds, series))
    if not panels:
        return None
    fig = _figure(max(6.0, 4.5 * len(panels)), 4.5)
    for i, (ds, series) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        _grouped_bars(ax, models, series)
        ax.set_title(ds)
        ax.set_ylabel("seconds")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    return _png(fig)


# ---- sections ----------------------------------------------------------------------------------


@dataclass
class ReportTable:
    title: str  # the dataset it is about; "" for a section's only table
    header: list[str]
    rows: list[list[str]]  # plain (unescaped) cell text


@dataclass
class ReportSection:
    """One part of the report: "## title", then its tables (each under "### dataset") or plots."""

    key: str  # metrics | efficiency | plots | samples
    title: str
    tables: list[ReportTable] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # PNG file names in the report folder

    def markdown_lines(self) -> list[str]:
        out = [f"## {self.title}", ""]
        for t in self.tables:
            out += ([f"### {_md_cell(t.title)}", ""] if t.title else []) + _md_table(t.header, t.rows)
        if self.plots:
            out += [f"![{Path(p).stem}]({p})" for p in self.plots] + [""]
        return out

    def markdown(self) -> str:
        return "\n".join(self.markdown_lines())


def report_sections(result: dict, plots: list[str] | None = None) -> list[ReportSection]:
    """The report's sections in order: Metrics (always, a table per dataset), Efficiency, Plots
    (the given plot file names) and Samples (a table per dataset), each only when it has content."""
    tables = _tables(result)
    sections = [
        ReportSection("metrics", "Metrics", [ReportTable(ds, h, r) for ds, (h, r) in tables["metrics"].items()])
    ]
    header, rows = tables["efficiency"]
    if rows:
        sections.append(ReportSection("efficiency", "Efficiency", [ReportTable("", header, rows)]))
    if plots:
        sections.append(ReportSection("plots", "Plots", plots=list(plots)))
    if tables["samples"]:
        sections.append(
            ReportSection("samples", "Samples", [ReportTable(ds, h, r) for ds, (h, r) in tables["samples"].items()])
        )
    return sections


def read_report_sections(out_dir: str | Path) -> list[ReportSection]:
    """The sections of the report written into out_dir (from its report.json and plot files)."""
    out_dir = Path(out_dir)
    result = read_eval_report(out_dir) or {}
    return report_sections(result, [name for name in PLOTS.values() if (out_dir / name).is_file()])


# ---- documents ---------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _render_md(result: dict, sections: list[ReportSection]) -> str:
    out = [f"# Evaluation report: {_md_cell(result.get('base') or '')}", ""]
    if result.get("created"):
        out += [f"Created: {_md_cell(result['created'])}", ""]
    for section in sections:
        out += section.markdown_lines()
    return "\n".join(out)


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Noto Sans", "Noto Sans CJK SC",
       "Microsoft YaHei", sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.samples td { max-width: 320px; word-wrap: break-word; white-space: normal; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.meta { color: #666; }
"""


def _html_table(header: list[str], rows: list[list[str]], cls: str = "", numeric_from: int = 1) -> str:
    out = [
        f'<table class="{cls}">' if cls else "<table>",
        "<thead><tr>" + "".join(f"<th>{_html_cell(h)}</th>" for h in header) + "</tr></thead>",
        "<tbody>",
    ]
    for row in rows:
        cells = [
            f'<td class="num">{_html_cell(c)}</td>' if i >= numeric_from else f"<td>{_html_cell(c)}</td>"
            for i, c in enumerate(row)
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</tbody>", "</table>"])


# how each section's tables are drawn: class, first right-aligned (numeric) column
_HTML_STYLE = {
    "efficiency": lambda header: {"numeric_from": 2},
    "samples": lambda header: {"cls": "samples", "numeric_from": len(header)},
}


def _render_html(result: dict, sections: list[ReportSection]) -> str:
    base = _html_cell(result.get("base") or "")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Evaluation report: {base}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>Evaluation report: {base}</h1>",
    ]
    if result.get("created"):
        out.append(f'<p class="meta">Created: {_html_cell(result["created"])}</p>')
    for section in sections:
        out.append(f"<h2>{_html_cell(section.title)}</h2>")
        style = _HTML_STYLE.get(section.key, lambda header: {})
        for t in section.tables:
            out += ([f"<h3>{_html_cell(t.title)}</h3>"] if t.title else []) + [
                _html_table(t.header, t.rows, **style(t.header))
            ]
        out += [f'<p><img src="{html.escape(p)}" alt="{html.escape(Path(p).stem)}"></p>' for p in section.plots]
    return "\n".join(out + ["</body>", "</html>", ""])


# ---- entry point -------------------------------------------------------------------------------


def write_report(result: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the plots (metrics.png, latency.png, and
    loss_curves.png when some adapter has a train log) into out_dir. Returns name -> path for
    every file written: "json", "markdown", "html", and "metrics", "loss_curves", "latency"
    for the plots that had data. The same content as data: report_sections / read_report_sections.

    All or nothing (files.atomic_write_files): every file is rendered, then all are written to temp
    names and renamed, so a full disk or an error leaves an earlier report in out_dir as it was."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {
        EVAL_REPORT: json.dumps(_jsonable(result), ensure_ascii=False, indent=2).encode("utf-8")
    }
    keys = {"json": EVAL_REPORT}

    makers = {"metrics": _plot_metrics, "loss_curves": _plot_loss_curves, "latency": _plot_latency}
    plots, stale = [], []
    for key, make in makers.items():
        data = make(result)
        if data is None:
            stale.append(out_dir / PLOTS[key])  # no stale plot from an earlier run in this folder
            continue
        files[PLOTS[key]] = data
        keys[key] = PLOTS[key]
        plots.append(PLOTS[key])

    sections = report_sections(result, plots)
    files["report.md"] = _render_md(result, sections).encode("utf-8")
    files["report.html"] = _render_html(result, sections).encode("utf-8")
    keys.update(markdown="report.md", html="report.html")
    written = atomic_write_files(out_dir, files)
    for path in stale:
        path.unlink(missing_ok=True)
    return {key: written[name] for key, name in keys.items()}
