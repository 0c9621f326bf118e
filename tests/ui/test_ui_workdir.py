"""The workdir: datasets (uploads checked like training data), the demo data, adapters and base models."""

import json

import pytest
from random_adapter import make_random_adapter

from lorakit.errors import DataError, LorakitError
from lorakit.runfolder import CHECKPOINT_MARKER
from lorakit.ui.workdir import DEMO_HELDOUT, DEMO_TRAIN, Workdir, check_name, safe_stem


def test_demo_data_is_offered_first_and_written_on_first_use(workdir):
    choices = workdir.dataset_choices()
    assert choices[0][1] == DEMO_TRAIN and "Marlowe" in choices[0][0]
    assert DEMO_HELDOUT in [v for _, v in workdir.dataset_choices(heldout=True)]
    train = workdir.resolve_dataset(DEMO_TRAIN)
    assert train.is_file() and len(train.read_text().splitlines()) == 120
    assert workdir.resolve_dataset(DEMO_HELDOUT).is_file()
    assert workdir.datasets() == []  # the demo files are not listed twice


def test_upload_is_checked_and_copied(workdir, alpaca_file, tmp_path):
    saved = workdir.save_upload(alpaca_file)
    assert saved == workdir.data_dir / "sums.json" and saved.read_bytes() == alpaca_file.read_bytes()
    assert (str(saved.relative_to(workdir.data_dir)), str(saved)) in workdir.dataset_choices()
    assert workdir.save_upload(alpaca_file) == saved  # the same file again: no copy
    other = tmp_path / "other" / "sums.json"
    other.parent.mkdir()
    other.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert workdir.save_upload(other).name == "sums-1.json"


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.json", '[{"instruction": "hi"}]', "bad.json: record 0: cannot tell the data format"),
        ("broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": ', "broken.jsonl: line 2"),
        ("notes.txt", "hello", "notes.txt: unsupported file kind '.txt'"),
        ("empty.json", "[]", "empty.json"),
    ],
)
def test_bad_upload_names_the_file_and_record(workdir, tmp_path, name, content, expected):
    upload = tmp_path / "gradio-temp-123" / name  # gradio keeps the name under a temp folder
    upload.parent.mkdir()
    upload.write_text(content)
    with pytest.raises(DataError) as e:
        workdir.save_upload(upload)
    assert str(e.value).startswith(expected), str(e.value)
    assert "gradio-temp-123" not in str(e.value)
    assert workdir.datasets() == []


def _checkpoint(run, step, tiny_model_dir, complete=True):
    folder = make_random_adapter(tiny_model_dir, run / f"checkpoint-{step}")
    if complete:
        (folder / CHECKPOINT_MARKER).write_text("{}")
    return folder


def test_adapters_finished_unfinished_and_plain_peft(workdir, tiny_model_dir):
    done = make_random_adapter(tiny_model_dir, workdir.adapters_dir / "done")
    (done / "manifest.json").write_text(
        json.dumps(
            {
                "base_model": str(tiny_model_dir),
                "created": "2025-01-01T10:00:00+00:00",
                "data": {"path": "/x/sums.json", "records": 24},
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
                "training": {"global_steps": 6, "eval_loss": None},
            }
        )
    )
    (done / "lorakit_config.yaml").write_text(f"base_model: {tiny_model_dir}\nlora_r: 4\n")
    (done / "train_log.jsonl").write_text('{"step": 5, "loss": 2.5}\n{"step": 6, "loss": 2.25}\n')
    stopped = workdir.adapters_dir / "stopped"
    stopped.mkdir()
    (stopped / "lorakit_config.yaml").write_text(f"base_model: {tiny_model_dir}\nprompt_template_name: alpaca_short\n")
    _checkpoint(stopped, 2, tiny_model_dir)
    _checkpoint(stopped, 4, tiny_model_dir, complete=False)  # died while saving: not offered
    make_random_adapter(tiny_model_dir, workdir.adapters_dir / "plain")  # saved by plain peft

    by_name = {a.name: a for a in workdir.adapters()}
    assert set(by_name) == {"done", "stopped", "plain"}
    assert by_name["done"].trained and by_name["done"].key == "done"
    assert by_name["stopped"].key == "stopped/checkpoint-2" and "unfinished" in by_name["stopped"].label
    assert by_name["plain"].trained
    keys = [k for _, k in workdir.adapter_choices()]
    assert sorted(keys) == ["done", "plain", "stopped/checkpoint-2"]
    assert workdir.resolve_adapter("stopped/checkpoint-2") == (stopped / "checkpoint-2").resolve()

    row = dict(
        zip(
            ["name", "status", "base", "data", "lora", "steps", "loss", "eval", "created"],
            by_name["done"].summary_row(),
        )
    )
    assert row["status"] == "trained" and row["data"] == "sums.json (24 records)" and row["steps"] == 6
    assert row["loss"] == 2.25 and row["lora"] == "r=4 alpha=8 q_proj"
    assert by_name["stopped"].summary_row()[1] == "unfinished (checkpoint-2)"
    assert by_name["stopped"].settings()["prompt_template_name"] == "alpaca_short"

    for bad in ("../done", "stopped/checkpoint-4", "nothing", ""):
        with pytest.raises(LorakitError):
            workdir.resolve_adapter(bad)


def test_base_models_offer_the_alias_and_local_folders(workdir):
    values = [v for _, v in workdir.base_model_choices()]
    assert values[0] == "smollm2-135m"
    assert str(workdir.models_dir / "tiny-llama") in values


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("../x", "holds a path separator"),
        ("a/b", "holds a path separator"),
        ("a\\b", "holds a path separator"),
        ("/etc/passwd", "is an absolute path"),
        ("C:x", "is an absolute path"),
        ("..", "holds '..'"),
        ("a..b", "holds '..'"),
        (".hidden", "starts with a dot"),
        ("a\x00b", "holds a control character"),
        ("line\nbreak", "holds a control character"),
        ("x" * 81, "is longer than 80 characters"),
        ("a b", "is not a usable folder name"),
        ("-flag", "is not a usable folder name"),
    ],
)
def test_bad_names_are_refused_saying_why(name, why):
    with pytest.raises(LorakitError) as e:
        check_name(name, "export name")
    assert str(e.value).startswith("export name: ") and why in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_good_names_pass():
    assert check_name(" run-1.b_2 ") == "run-1.b_2"
    assert check_name("x" * 80) == "x" * 80
    assert safe_stem("../../my data (1)") == "my_data_1" and safe_stem("...") == "data"
    assert check_name(safe_stem("a..b/../c d" * 20))  # a default name made from any text is usable


def test_path_for_keeps_names_in_their_folder_links_included(workdir, tmp_path):
    assert workdir.path_for(workdir.merged_dir, "m1", "merged model name") == workdir.merged_dir / "m1"
    outside = tmp_path / "outside"
    outside.mkdir()
    (workdir.merged_dir / "planted").symlink_to(outside)  # a link someone left in the workdir
    with pytest.raises(LorakitError, match="merged model name: .*planted leads outside"):
        workdir.path_for(workdir.merged_dir, "planted", "merged model name")
    (workdir.root / "exports").symlink_to(outside)  # the folder itself leads out
    with pytest.raises(LorakitError, match="is outside the workdir"):
        workdir.path_for(workdir.root / "exports", "fine-name", "export name")
    with pytest.raises(LorakitError, match="holds a path separator"):
        workdir.path_for(workdir.merged_dir, "../../escape", "merged model name")
    assert list(outside.iterdir()) == []


def test_every_typed_name_goes_through_the_check(workdir, tiny_model_dir):
    """Run, export and merged-model names: a bad one is refused before anything is written."""
    from lorakit.ui.evaluation import merge_into_workdir
    from lorakit.ui.tabs.export import export_argv
    from lorakit.ui.training import form_defaults, prepare_run

    make_random_adapter(tiny_model_dir, workdir.adapters_dir / "good")
    assert workdir.exports_dir.is_dir() and workdir.merged_dir.is_dir()  # made on first use, empty
    before = sorted(p.relative_to(workdir.root) for p in workdir.root.rglob("*"))
    for bad in ("../evil", "/tmp/evil", ".evil", "e\x00vil"):
        with pytest.raises(LorakitError, match="^adapter name: "):
            prepare_run(workdir, form_defaults(), "d.json", name=bad)
        with pytest.raises(LorakitError, match="^export name: "):
            export_argv(workdir, "good", "hf", name=bad)
        with pytest.raises(LorakitError, match="^merged model name: "):
            merge_into_workdir(workdir, "good", bad)
    assert sorted(p.relative_to(workdir.root) for p in workdir.root.rglob("*")) == before
    args, out = export_argv(workdir, "good", "hf")  # the default name is a checked one too
    assert out == workdir.exports_dir / "good-hf" and args[-1] == str(out)


def test_an_upload_over_the_limit_is_refused_naming_file_and_limit(workdir, alpaca_file):
    small = Workdir(workdir.root, max_upload_bytes=alpaca_file.stat().st_size - 1)
    with pytest.raises(DataError) as e:
        small.save_upload(alpaca_file)
    assert str(e.value).startswith("sums.json: ") and "upload limit" in str(e.value)
    assert "--max-upload-mb" in str(e.value)
    assert small.datasets() == [] and list(small.data_dir.iterdir()) == []  # nothing written
    assert Workdir(workdir.root, max_upload_bytes=alpaca_file.stat().st_size).save_upload(alpaca_file).is_file()


def test_an_upload_name_cannot_leave_data(workdir, alpaca_file):
    saved = workdir.save_upload(alpaca_file, original_name="../../../.evil name.json")
    assert saved.parent == workdir.data_dir and saved.name == "evil_name.json"
