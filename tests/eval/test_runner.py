"""`lorakit eval` on a tiny model: the base and two adapters, two eval sets, one report."""

import json

import pytest
from random_adapter import make_random_adapter

from lorakit.errors import LorakitError
from lorakit.eval.runner import evaluate


def test_eval_base_and_two_adapters(tiny_model_dir, tmp_path):
    alpaca = tmp_path / "qa.json"
    alpaca.write_text(
        json.dumps([{"instruction": f"What is {i} plus {i}?", "input": "", "output": str(2 * i)} for i in range(6)])
    )
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(
        "".join(
            json.dumps({"question": f"Add {i} and 1.", "answer": f"It is {i + 1}.\n#### {i + 1}"}) + "\n"
            for i in range(5)
        )
    )
    a1 = make_random_adapter(tiny_model_dir, tmp_path / "one", seed=1)
    a2 = make_random_adapter(tiny_model_dir, tmp_path / "two", seed=2)
    result = evaluate(
        str(tiny_model_dir),
        [str(a1), str(a2)],
        [str(alpaca), str(gsm)],
        tmp_path / "report",
        limit=4,
        max_new_tokens=6,
        batch_size=3,
    )
    assert list(result["scores"]) == ["base", "one", "two"]
    for model_scores in result["scores"].values():
        assert set(model_scores) == {"qa", "gsm"}
        row = model_scores["gsm"]
        for key in (
            "exact_match",
            "f1",
            "bleu",
            "rouge_l",
            "contains",
            "loss",
            "perplexity",
            "latency_p50_s",
            "latency_p95_s",
            "tokens_per_s",
            "peak_memory_mib",
        ):
            assert row[key] is not None, key
        assert row["perplexity"] == pytest.approx(2.718281828 ** row["loss"], rel=1e-6)
    assert result["datasets"][0]["examples"] == 4
    # the adapters really change the model: different reference losses
    losses = {m: result["scores"][m]["qa"]["loss"] for m in result["scores"]}
    assert len({round(v, 6) for v in losses.values()}) == 3, losses
    # 2 layers x (q: A 4x64 + B 64x4, v: A 4x64 + B 32x4; v is 2 kv heads x 16 wide)
    assert result["models"][1]["trainable_params"] == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    sample = result["samples"]["gsm"][0]
    assert set(sample["answers"]) == {"base", "one", "two"} and sample["reference"].endswith("#### 1")
    for name in ("report.json", "report.md", "report.html", "metrics.png", "latency.png"):
        assert (tmp_path / "report" / name).is_file(), name


def test_eval_errors(tiny_model_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "hi", "output": "x"}]))
    with pytest.raises(LorakitError, match="--metrics: unknown nope"):
        evaluate(str(tiny_model_dir), [], [str(data)], tmp_path / "r", metrics=["nope"])
    with pytest.raises(LorakitError, match="no instruction/answer examples"):
        text = tmp_path / "t.jsonl"
        text.write_text('{"text": "plain"}\n')
        evaluate(str(tiny_model_dir), [], [str(text)], tmp_path / "r")
