"""Training from the page: form values -> validated config -> a `lorakit train` process the page
follows (progress, Done, failure) and can stop, keeping the last complete checkpoint."""

import json
import signal
import sys
import threading
import time

import pytest

from lorakit.config import load_config
from lorakit.errors import ConfigError, LorakitError
from lorakit.runfolder import CHECKPOINT_MARKER, complete_checkpoints, read_train_log
from lorakit.ui.training import (
    RunManager,
    TrainingRun,
    build_config,
    error_summary,
    form_defaults,
    format_duration,
    output_lines,
    prepare_run,
    stop_signal,
    values_from_config,
)


def test_form_starts_from_the_usual_defaults():
    d = form_defaults()
    assert (d["lora_r"], d["lora_alpha"], d["learning_rate"], d["lora_target_modules"]) == (
        8,
        16,
        3e-4,
        ["q_proj", "v_proj"],
    )
    assert d["base_model"] == "smollm2-135m" and d["prompt_template_name"] == "alpaca"
    assert d["logging_steps"] == 1  # a loss point per step for the live chart
    assert d["eval_steps"] == d["save_steps"] == 50  # evaluation beside checkpoints (a multiple of it)
    assert build_config({**d, "eval_steps": 10.0}, "d.json", "out").eval_steps == 10


def test_build_config_validates_and_names_the_key(tmp_path):
    values = form_defaults()
    cfg = build_config(
        {**values, "lora_r": 16.0, "max_steps": 0, "batch_size": 8.0, "micro_batch_size": 2},
        tmp_path / "d.json",
        tmp_path / "out",
    )
    assert cfg.lora_r == 16 and cfg.max_steps == -1 and cfg.batch_size == 8  # 0 on the form = by epochs
    with pytest.raises(ConfigError, match=r"^settings: lora_r: .*greater than 0"):
        build_config({**values, "lora_r": 0}, "d.json", "out")
    with pytest.raises(ConfigError, match="batch_size .*multiple of micro_batch_size"):
        build_config({**values, "batch_size": 10, "micro_batch_size": 4}, "d.json", "out")
    with pytest.raises(ConfigError, match="lr_scheduler_type"):
        build_config({**values, "lr_scheduler_type": "sometimes"}, "d.json", "out")


def test_values_from_a_recorded_config_fill_the_form():
    values = values_from_config({"lora_r": 32, "lora_target_modules": "all-linear", "output_dir": "x", "seed": 3})
    assert values["lora_r"] == 32 and values["lora_target_modules"] == "all-linear" and values["seed"] == 3
    assert "output_dir" not in values and values["lora_alpha"] == 16


def test_prepare_run_writes_a_config_the_cli_repeats(workdir, tiny_base, alpaca_file):
    values = {**form_defaults(), "base_model": tiny_base, "max_steps": 5}
    run = prepare_run(workdir, values, alpaca_file, name="first")
    assert run.config_path == workdir.adapters_dir / "first" / "train.yaml"
    cfg = load_config(run.config_path)  # exactly what `lorakit train train.yaml` reads
    assert cfg.base_model == tiny_base and cfg.data_path == str(alpaca_file) and cfg.max_steps == 5
    assert cfg.output_dir == str(workdir.adapters_dir / "first")
    assert run.command_line == f"lorakit train {run.config_path}"
    assert run.argv[1:4] == ["-m", "lorakit.cli", "train"]
    auto = prepare_run(workdir, values, alpaca_file)
    assert auto.name.startswith("lora-sums-")
    (workdir.adapters_dir / "first" / "manifest.json").write_text("{}")
    with pytest.raises(LorakitError, match="already holds a trained adapter"):
        prepare_run(workdir, values, alpaca_file, name="first")
    with pytest.raises(LorakitError, match="no complete checkpoint"):
        prepare_run(workdir, values, alpaca_file, name="first", resume=True)
    with pytest.raises(LorakitError, match="adapter name"):
        prepare_run(workdir, values, alpaca_file, name="../elsewhere")


BAR_LOG = (
    "$ lorakit train x.yaml\nlorakit data: 24 alpaca records\nlorakit model: tiny\n"
    "\r  0%|          | 0/99 [00:00<?, ?it/s]"
    "\r 10%|█         | 9/99 [00:03<00:27,  1.00it/s, loss=2.1000, tok/s=300]\n"
)  # never read


def _fake_run(tmp_path, script: str, total=None) -> TrainingRun:
    """A TrainingRun whose process is a short script instead of the trainer."""
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)

    class Fake(TrainingRun):
        @property
        def argv(self):
            return [sys.executable, "-c", script]

    return Fake("fake", out, out / "train.yaml", [], total_steps=total).start()


def _record(step, **more) -> str:
    return (
        json.dumps({"step": step, "total_steps": 30, "elapsed_s": float(step), "remaining_s": 30.0 - step, **more})
        + "\n"
    )


class _Sleeper(TrainingRun):
    """A run whose process sleeps instead of training."""

    @property
    def argv(self):
        return [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def no_run_left():
    """Stop whatever run the test left going (RunManager's one-run rule is process-wide)."""
    yield
    run = RunManager._active
    if run is not None and run.running:
        run.stop(grace_s=1)
        run.wait(10)


def test_two_starts_at_the_same_moment_start_one_run(tmp_path, no_run_left):
    """Two sessions (here: two threads, two managers) press Start together: the check "nothing is
    running" and the start are one step under the process's lock, so exactly one run starts and
    the other is refused, however the threads interleave."""
    gate = threading.Barrier(2)
    started, refused = [], []

    def press_start(name):
        def prepare():  # validation and writing the config take a while: both would pass an unlocked check
            time.sleep(0.3)
            out = tmp_path / name
            out.mkdir()
            return _Sleeper(name, out, out / "train.yaml", [])

        gate.wait()
        try:
            started.append(RunManager().launch(prepare))
        except LorakitError as e:
            refused.append((name, str(e)))

    threads = [threading.Thread(target=press_start, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(started) == 1 and len(refused) == 1, (started, refused)
    winner, (loser, message) = started[0], refused[0]
    assert winner.running and message == f"a run is in progress ({winner.name}); stop it or wait until it ends"
    assert not (tmp_path / loser).exists()  # the refused one wrote nothing
    assert RunManager._active is winner


def test_a_refused_start_writes_nothing_and_a_name_in_use_is_refused(workdir, tiny_base, alpaca_file, no_run_left):
    values = {**form_defaults(), "base_model": tiny_base, "max_steps": 5}
    runs = RunManager()
    out = workdir.adapters_dir / "going"
    out.mkdir()
    runs.start(_Sleeper("going", out, out / "train.yaml", []))
    with pytest.raises(LorakitError, match=r"a run is in progress \(going\)"):
        runs.launch(lambda: prepare_run(workdir, values, alpaca_file, name="second"))
    with pytest.raises(LorakitError, match=r"a run is in progress \(going\)"):  # its own name: same answer
        RunManager().launch(lambda: prepare_run(workdir, values, alpaca_file, name="going"))
    assert not (workdir.adapters_dir / "second").exists() and not (out / "train.yaml").exists()
    runs.stop()
    runs.run.wait(10)

    # nothing running now: a name already used on disk is still refused, and its folder left alone
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LorakitError, match="adapter name: going is already in use"):
        runs.launch(lambda: prepare_run(workdir, values, alpaca_file, name="going"))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train.log"]


def test_two_prepares_of_one_name_claim_it_once(workdir, tiny_base, alpaca_file):
    """The run folder is claimed with an atomic mkdir, so even two processes on one workdir never
    both prepare a run in one folder."""
    values = {**form_defaults(), "base_model": tiny_base, "max_steps": 5}
    gate = threading.Barrier(4)
    outcomes = []

    def prepare():
        gate.wait()
        try:
            outcomes.append(prepare_run(workdir, values, alpaca_file, name="same"))
        except LorakitError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    runs = [o for o in outcomes if isinstance(o, TrainingRun)]
    assert len(runs) == 1 and len(outcomes) == 4, outcomes
    assert all("adapter name: same is already in use" in o for o in outcomes if isinstance(o, str))


def test_progress_comes_from_the_train_log(tmp_path):
    """Step, total and time left come from train_log.jsonl's records (JsonlLogCallback), not from
    the progress bar's text in the output, which the page does not parse."""
    log = tmp_path / "bar.txt"
    log.write_text(BAR_LOG)
    script = f"import sys, time; sys.stdout.write(open({str(log)!r}).read()); sys.stdout.flush(); time.sleep(30)"
    run = _fake_run(tmp_path, script)
    try:
        _wait(lambda: "lorakit model" in run.log_path.read_text(), 30, "the child to start")
        st = run.status()  # no record yet: starting, with the run's last status line
        assert (st.state, st.step, st.total, st.eta_s) == ("starting", None, None, None)
        assert st.phase == "lorakit model: tiny" and st.progress_line().endswith(": lorakit model: tiny")
        (run.output_dir / "train_log.jsonl").write_text(
            "".join(_record(s, loss=3.0 - s / 10, tokens_per_s=300.0 + s) for s in range(1, 6))
            + _record(6, eval_loss=2.2)
            + '{"step": 7, "lo'
        )  # a line being written
        st = run.status()
        assert (st.state, st.step, st.total, st.eta_s) == ("training", 6, 30, 24.0)
        assert st.loss == pytest.approx(2.5) and st.tokens_per_s == pytest.approx(303.0)
        assert [p["step"] for p in st.points] == [1, 2, 3, 4, 5, 6] and st.log_lines == 6
        line = st.progress_line()
        assert line.startswith("step 6/30 · loss 2.5000 · 303 tokens/s · elapsed ") and "time left 0:24" in line
    finally:
        run.stop(grace_s=2)
        run.wait(10)


def test_a_resumed_run_reads_only_its_own_records(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.jsonl").write_text("".join(_record(s, loss=1.0) for s in (1, 2, 3)))  # the first run's
    run = _fake_run(tmp_path, "import time; time.sleep(30)")
    try:
        st = run.status()
        assert st.state == "starting" and st.step is None and st.log_lines == 3  # the chart keeps them
        with (out / "train_log.jsonl").open("a") as f:
            f.write(_record(4, loss=0.9))
        st = run.status()
        assert (st.state, st.step, st.eta_s, st.loss) == ("training", 4, 26.0, 0.9)
    finally:
        run.stop(grace_s=2)
        run.wait(10)


@pytest.mark.parametrize(
    "script, state, expected",
    [
        (
            "import sys; print('lorakit data: ...'); "
            "print('error: data_path: x.json: file not found', file=sys.stderr); "
            "sys.exit(2)",
            "failed",
            "error: data_path: x.json: file not found",
        ),
        (
            "import sys; print('Traceback (most recent call last):'); print('  File \"x.py\", line 1'); "
            "print('RuntimeError: out of memory'); sys.exit(1)",
            "failed",
            "RuntimeError: out of memory",
        ),
    ],
)
def test_a_failed_run_shows_why(tmp_path, script, state, expected):
    run = _fake_run(tmp_path, script)
    run.wait(20)
    st = run.status()
    assert st.state == state and expected in st.message and "Training failed" in st.message


def test_stop_escalates_when_the_run_ignores_sigint(tmp_path):
    run = _fake_run(
        tmp_path,
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "print('lorakit model: tiny', flush=True); time.sleep(120)",
    )
    _wait(lambda: "lorakit model" in run.log_path.read_text(), 30, "the child to start")
    t0 = time.time()
    run.stop(grace_s=1)
    assert run.wait(30) is not None and time.time() - t0 < 10  # SIGTERM after 1 s
    assert run.status().state == "stopped"


def test_stop_uses_sigterm_where_sigint_is_ignored():
    # set both dispositions here: the test itself may run under `&` or nohup, where SIGINT is ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert stop_signal() == signal.SIGINT
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under `lorakit ui &`: children inherit it
        assert stop_signal() == signal.SIGTERM
    finally:
        signal.signal(signal.SIGINT, previous)


def test_output_lines_and_durations():
    assert output_lines("a\rb\rc\nd\n\r  \n") == ["c", "d"]
    assert error_summary("x\nerror: first\nmore\nerror: last\n") == "error: last"
    assert (format_duration(5), format_duration(65), format_duration(3725), format_duration(None)) == (
        "0:05",
        "1:05",
        "1:02:05",
        "?",
    )


# ---- the real trainer: stop keeps the last complete checkpoint, resume continues; a failure is shown


def _wait(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_stop_keeps_the_last_checkpoint_and_resume_continues(workdir, tiny_base, alpaca_file):
    values = {
        **form_defaults(),
        "base_model": tiny_base,
        "max_steps": 100000,
        "batch_size": 2,
        "micro_batch_size": 2,
        "save_steps": 3,
        "save_total_limit": 2,
    }
    runs = RunManager()
    run = runs.launch(lambda: prepare_run(workdir, values, alpaca_file, name="long"))
    with pytest.raises(LorakitError, match="a run is in progress"):
        runs.launch(lambda: prepare_run(workdir, values, alpaca_file, name="second"))
    assert not (workdir.adapters_dir / "second").exists()
    try:
        _wait(
            lambda: complete_checkpoints(run.output_dir) and run.status().state == "training",
            180,
            "a complete checkpoint",
        )
    finally:
        assert runs.stop()
    assert run.wait(60) is not None
    st = run.status()
    kept = complete_checkpoints(run.output_dir)
    assert st.state == "stopped", run.log_path.read_text()[-2000:]
    assert kept and (kept[-1] / CHECKPOINT_MARKER).is_file() and not (run.output_dir / "manifest.json").exists()
    assert f"Kept: **{kept[-1].name}**" in st.message and "resume_from_checkpoint=true" in st.message
    assert workdir.adapter("long").key == f"long/{kept[-1].name}"  # chat with it meanwhile

    step = int(kept[-1].name.split("-")[1])
    again = prepare_run(workdir, {**values, "max_steps": step + 2}, alpaca_file, name="long", resume=True)
    assert again.command_line.endswith("resume_from_checkpoint=true")
    runs.start(again)
    assert again.wait(180) == 0, again.log_path.read_text()[-3000:]
    st = again.status()
    assert st.state == "done" and "**Done**: " in st.message
    manifest = json.loads((again.output_dir / "manifest.json").read_text())
    assert manifest["training"]["global_steps"] == step + 2
    assert manifest["training"]["resumed_from"].endswith(kept[-1].name)


def test_a_training_error_reaches_the_page(workdir, tiny_base, alpaca_file):
    values = {**form_defaults(), "base_model": tiny_base, "max_steps": 2, "lora_target_modules": ["nope_proj"]}
    run = RunManager().start(prepare_run(workdir, values, alpaca_file, name="bad"))
    assert run.wait(120) == 2
    st = run.status()
    assert st.state == "failed"
    assert "error: lora_target_modules: the model has no module named nope_proj" in st.message


def test_a_run_with_validation_and_the_default_intervals_trains_to_the_end(workdir, tiny_base, tmp_path):
    """16 validation examples and the form's own save/eval intervals: the run passes an
    evaluation and a checkpoint (step 50) and ends with a verified adapter."""
    from conftest import alpaca_records

    data = tmp_path / "more.json"
    data.write_text(json.dumps(alpaca_records(48)), encoding="utf-8")
    values = {
        **form_defaults(),
        "base_model": tiny_base,
        "val_set_size": 16,
        "max_steps": 52,
        "batch_size": 2,
        "micro_batch_size": 2,
    }
    run = RunManager().start(prepare_run(workdir, values, data, name="validated"))
    assert run.wait(300) == 0, run.log_path.read_text()[-3000:]
    st = run.status()
    assert st.state == "done" and st.step == st.total == 52, st
    manifest = json.loads((run.output_dir / "manifest.json").read_text())
    assert manifest["training"]["global_steps"] == 52 and manifest["training"]["eval_loss"] is not None
    log = read_train_log(run.output_dir)
    assert any("eval_loss" in r and r["step"] == 50 for r in log)
