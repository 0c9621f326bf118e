import copy
import json

import pytest

from lorakit.eval.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scores(loss, em, p50):
    return {
        "loss": loss,
        "perplexity": 2.0**loss,
        "exact_match": em,
        "f1": em + 5.0,
        "bleu": None,
        "latency_p50_s": p50,
        "latency_p95_s": p50 * 1.5,
        "tokens_per_s": 30.5,
        "peak_memory_mib": 2400.0,
    }


@pytest.fixture
def result():
    return {
        "created": "2024-05-01T12:00:00",
        "base": "smollm2-135m",
        "models": [
            {"name": "base", "adapter": None, "adapter_size_bytes": None, "trainable_params": None, "train_log": []},
            {
                "name": "my-adapter",
                "adapter": "/tmp/adapter",
                "adapter_size_bytes": 9823216,
                "trainable_params": 921600,
                "train_log": [
                    {"step": 1, "loss": 2.0},
                    {"step": 5, "loss": 1.7, "learning_rate": 1e-4},
                    {"step": 5, "eval_loss": 1.8},
                    {"step": 10, "loss": "nan"},
                    {"step": 10, "eval_loss": 1.6},
                ],
            },
        ],
        "datasets": [
            {"name": "gsm8k_test", "path": "gsm8k.jsonl", "examples": 2},
            {"name": "zh_qa", "path": "zh.jsonl", "examples": 1},
        ],
        "scores": {
            "base": {"gsm8k_test": _scores(1.5, 10.0, 0.8), "zh_qa": _scores(2.0, 0.0, 0.9)},
            "my-adapter": {
                "gsm8k_test": _scores(1.2, 40.0, 0.85),
                "zh_qa": {"loss": 1.9, "contains": 50.0, "latency_p50_s": 1.0},
            },
        },
        "samples": {
            "gsm8k_test": [
                {
                    "prompt": "What is <b>2+2</b>? a|b",
                    "reference": "4",
                    "answers": {"base": "line1\nline2", "my-adapter": "4"},
                },
                {"prompt": "x" * 1000, "reference": "y", "answers": {"base": "z"}},
            ],
            "zh_qa": [
                {
                    "prompt": "中国的首都是哪里？",
                    "reference": "北京",
                    "answers": {"base": "上海", "my-adapter": "北京"},
                }
            ],
        },
    }


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 2000


def test_write_report(tmp_path, result):
    out = tmp_path / "report"
    paths = write_report(copy.deepcopy(result), out)

    for key in ("json", "markdown", "html", "metrics", "loss_curves", "latency"):
        assert paths[key].is_file() and paths[key].parent == out
    for name in ("metrics.png", "loss_curves.png", "latency.png"):
        _check_png(out / name)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == result
    assert "中国的首都是哪里" in (out / "report.json").read_text(encoding="utf-8")

    page = (out / "report.html").read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in page
    assert "&lt;b&gt;2+2&lt;/b&gt;" in page and "<b>2+2" not in page
    assert "中国的首都是哪里？" in page and "北京" in page
    for name in ("metrics.png", "loss_curves.png", "latency.png"):
        assert f'src="{name}"' in page
    assert "http://" not in page and "https://" not in page  # self-contained

    md = (out / "report.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    for ds in ("gsm8k_test", "zh_qa"):
        section = lines[lines.index(f"### {ds}") :]  # first occurrence: the metrics table
        table = section[2 : section.index("", 2)]
        assert len(table) == 2 + 2  # header, separator, one row per model
        assert table[2].startswith("| base |") and table[3].startswith("| my-adapter |")
    assert "| 1.50 |" in md  # 2 decimals
    assert "9.37" in md and "921,600" in md  # adapter MiB, trainable params
    assert "a\\|b" in md and "line1<br>line2" in md and "&lt;b&gt;" in md
    assert "x" * 300 in md and "x" * 301 not in md  # long cells truncated
    assert "北京" in md
    assert "![metrics](metrics.png)" in md and "![loss_curves](loss_curves.png)" in md


def test_no_train_log_no_loss_curves(tmp_path, result):
    for m in result["models"]:
        m["train_log"] = []
    paths = write_report(result, tmp_path)
    assert "loss_curves" not in paths
    assert not (tmp_path / "loss_curves.png").exists()
    _check_png(tmp_path / "metrics.png")
    _check_png(tmp_path / "latency.png")
    assert "loss_curves.png" not in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "loss_curves.png" not in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_missing_scores_and_nan(tmp_path):
    result = {
        "created": "now",
        "base": "m",
        "models": [{"name": "base", "adapter": None, "adapter_size_bytes": None, "trainable_params": None}],
        "datasets": [{"name": "d", "path": "d.jsonl", "examples": 0}],
        "scores": {"base": {"d": {"loss": float("nan"), "exact_match": None}}},
        "samples": {},
    }
    paths = write_report(result, tmp_path)
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["scores"]["base"]["d"]["loss"] is None
    assert paths["html"].is_file() and paths["markdown"].is_file()
    assert "metrics" not in paths and "latency" not in paths


def test_the_report_as_sections(tmp_path, result):
    """The report as data (what the UI shows): the same sections, tables and plots as report.md."""
    from lorakit.eval.report import read_report_sections

    write_report(copy.deepcopy(result), tmp_path)
    sections = read_report_sections(tmp_path)
    assert [s.title for s in sections] == ["Metrics", "Efficiency", "Plots", "Samples"]
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert [line[3:] for line in md.splitlines() if line.startswith("## ")] == [s.title for s in sections]
    metrics, efficiency, plots, samples = sections
    assert [t.title for t in metrics.tables] == ["gsm8k_test", "zh_qa"]
    assert metrics.tables[0].header[0] == "Model" and [row[0] for row in metrics.tables[0].rows] == [
        "base",
        "my-adapter",
    ]
    assert efficiency.tables[0].title == "" and "921,600" in efficiency.tables[0].rows[-1]
    assert plots.plots == ["metrics.png", "loss_curves.png", "latency.png"] and not plots.tables
    assert samples.tables[1].rows[0][1] == "中国的首都是哪里？"
    for s in sections:
        assert s.markdown() in md  # each section renders exactly as in report.md
