"""The typed config, in process: Alpaca-LoRA's finetune.py keys load unchanged, key=value overrides
parse to the right types, every invalid value fails in one line naming its key (and file)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from lorakit.config import TrainConfig, config_help, dump_config, load_config, parse_override
from lorakit.errors import ConfigError

# Every keyword argument of Alpaca-LoRA's finetune.py `train()`, with its defaults (base_model and
# data_path filled in). load_config only reads them: nothing here is resolved or downloaded.
ALPACA_LORA = {
    "base_model": "huggyllama/llama-7b",
    "data_path": "yahma/alpaca-cleaned",
    "output_dir": "./lora-alpaca",
    "batch_size": 128,
    "micro_batch_size": 4,
    "num_epochs": 3,
    "learning_rate": 3e-4,
    "cutoff_len": 256,
    "val_set_size": 2000,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "v_proj"],
    "train_on_inputs": True,
    "add_eos_token": False,
    "group_by_length": False,
    "wandb_project": "",
    "wandb_run_name": "",
    "wandb_watch": "",
    "wandb_log_model": "",
    "resume_from_checkpoint": None,
    "prompt_template_name": "alpaca",
}

# As a user writes it: 3e-4 without a dot, which PyYAML reads as a string.
FINETUNE_YML = """\
base_model: huggyllama/llama-7b
data_path: yahma/alpaca-cleaned
output_dir: ./lora-alpaca
# training hyperparams
batch_size: 128
micro_batch_size: 4
num_epochs: 3
learning_rate: 3e-4
cutoff_len: 256
val_set_size: 2000
# lora hyperparams
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
  - q_proj
  - v_proj
# llm hyperparams
train_on_inputs: true  # if False, masks out inputs in loss
add_eos_token: false
group_by_length: false  # faster, but produces an odd training loss curve
# wandb params
wandb_project: ""
wandb_run_name: ""
wandb_watch: ""  # options: false | gradients | all
wandb_log_model: ""  # options: false | true
resume_from_checkpoint: null  # either training checkpoint or final adapter
prompt_template_name: alpaca  # The prompt template to use, will default to alpaca.
"""


def write(tmp_path, text: str, name: str = "finetune.yml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---- Alpaca-LoRA compatibility --------------------------------------------------------------


def test_alpaca_lora_finetune_yml_loads_unchanged(tmp_path):
    assert set(yaml.safe_load(FINETUNE_YML)) == set(ALPACA_LORA)
    assert set(ALPACA_LORA) <= set(TrainConfig.model_fields)
    cfg = load_config(write(tmp_path, FINETUNE_YML))
    for key, value in ALPACA_LORA.items():
        assert getattr(cfg, key) == value, key
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == pytest.approx(3e-4)
    assert isinstance(cfg.batch_size, int) and isinstance(cfg.micro_batch_size, int)
    assert isinstance(cfg.cutoff_len, int) and isinstance(cfg.lora_r, int)
    assert cfg.train_on_inputs is True and cfg.add_eos_token is False and cfg.group_by_length is False
    assert cfg.resume_from_checkpoint is None
    assert cfg.val_count(10_000) == 2000


def test_dump_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, FINETUNE_YML))
    again = load_config(write(tmp_path, dump_config(cfg), "dumped.yaml"))
    assert again == cfg


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n"), for_training=False) == TrainConfig()
    assert load_config(None, for_training=False) == TrainConfig()


# ---- overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, expected, kind",
    [
        ("max_steps=30", "max_steps", 30, int),
        ("learning_rate=1e-4", "learning_rate", 1e-4, float),
        ("learning_rate=0.0002", "learning_rate", 2e-4, float),
        ("lora_target_modules=q_proj,v_proj", "lora_target_modules", ["q_proj", "v_proj"], list),
        ("lora_target_modules=q_proj, k_proj ,v_proj", "lora_target_modules", ["q_proj", "k_proj", "v_proj"], list),
        ("lora_target_modules=[q_proj, o_proj]", "lora_target_modules", ["q_proj", "o_proj"], list),
        ("lora_target_modules=all-linear", "lora_target_modules", "all-linear", str),
        ("train_on_inputs=false", "train_on_inputs", False, bool),
        ("train_on_inputs=true", "train_on_inputs", True, bool),
        ("resume_from_checkpoint=true", "resume_from_checkpoint", True, bool),
        ("resume_from_checkpoint=false", "resume_from_checkpoint", None, type(None)),
        ("resume_from_checkpoint=out/checkpoint-200", "resume_from_checkpoint", "out/checkpoint-200", str),
        ("val_set_size=0.1", "val_set_size", 0.1, float),
        ("data_path=data/train.jsonl", "data_path", "data/train.jsonl", str),
        ("wandb_project=", "wandb_project", "", str),
        # values YAML would read as numbers or booleans stay text in a text field
        ("output_dir=2024", "output_dir", "2024", str),
        ("wandb_run_name=1", "wandb_run_name", "1", str),
        ("wandb_log_model=true", "wandb_log_model", "true", str),
        ("wandb_watch=false", "wandb_watch", "false", str),
        ("output_dir=0123", "output_dir", "0123", str),  # as typed: not YAML's octal 83
        ("wandb_run_name=1.10", "wandb_run_name", "1.10", str),
    ],
)
def test_override_types(override, key, expected, kind):
    value = getattr(load_config(None, [override], for_training=False), key)
    assert type(value) is kind, (override, value)
    assert value == (pytest.approx(expected) if kind is float else expected)


def test_text_field_values_in_yaml_file(tmp_path):
    """The documented W&B options (false | true) work unquoted in a file too."""
    cfg = load_config(
        write(tmp_path, "wandb_watch: false\nwandb_log_model: true\nwandb_run_name: 7\n"), for_training=False
    )
    assert (cfg.wandb_watch, cfg.wandb_log_model, cfg.wandb_run_name) == ("false", "true", "7")


@pytest.mark.parametrize("key", [k for k, f in TrainConfig.model_fields.items() if f.annotation is str])
def test_every_text_field_takes_number_like_text(key):
    assert getattr(load_config(None, [f"{key}=2024"], for_training=False), key) == "2024"
    assert getattr(TrainConfig(**{key: 2024}), key) == "2024"


def test_overrides_beat_the_file(tmp_path):
    cfg = load_config(write(tmp_path, FINETUNE_YML), ["lora_r=16", "micro_batch_size=8", "num_epochs=1"])
    assert (cfg.lora_r, cfg.micro_batch_size, cfg.num_epochs) == (16, 8, 1)
    assert cfg.lora_alpha == 16  # untouched keys keep the file's value


def test_parse_override_splits_on_first_equals():
    assert parse_override("data_path=a=b.json") == ("data_path", "a=b.json")
    assert parse_override(" max_steps = 5") == ("max_steps", 5)


# ---- invalid values: one line naming the key (and the file) -----------------------------------


@pytest.mark.parametrize(
    "text, needles",
    [
        pytest.param("lora_r: 0\n", ["lora_r", "greater than 0", "got 0"], id="lora_r-0"),
        pytest.param("lora_dropout: 1.5\n", ["lora_dropout", "got 1.5"], id="lora_dropout-1.5"),
        pytest.param("lr_scheduler_type: bogus\n", ["lr_scheduler_type", "cosine", "'bogus'"], id="scheduler"),
        pytest.param("cutoff_len: -1\n", ["cutoff_len", "got -1"], id="cutoff_len--1"),
        pytest.param(
            "batch_size: 6\nmicro_batch_size: 4\n",
            ["batch_size (6)", "multiple of micro_batch_size (4)"],
            id="batch-not-multiple",
        ),
        pytest.param("load_in_8bit: true\nload_in_4bit: true\n", ["load_in_8bit", "load_in_4bit"], id="8bit-and-4bit"),
        pytest.param(
            "lora_rank: 8\n", ["unknown key 'lora_rank'", "known keys: ", "lora_r, ", "lora_alpha"], id="unknown-key"
        ),
        pytest.param("precision: fp8\n", ["precision", "'fp8'"], id="precision"),
        pytest.param("max_steps: 1.5\n", ["max_steps", "got 1.5"], id="max_steps-fraction"),
        pytest.param("train_on_inputs: maybe\n", ["train_on_inputs", "'maybe'"], id="bool"),
        pytest.param("lora_target_modules: []\n", ["lora_target_modules", "at least one"], id="no-targets"),
        pytest.param("val_set_size: -1\n", ["val_set_size", "got -1"], id="val_set_size-negative"),
        pytest.param("- lora_r\n- 8\n", ["expected a mapping", "list"], id="list-not-mapping"),
        pytest.param("just text\n", ["expected a mapping", "str"], id="scalar-not-mapping"),
        pytest.param("lora_r: [8\n", ["invalid YAML at line"], id="invalid-yaml"),
    ],
)
def test_invalid_file_value_names_file_and_key(tmp_path, text, needles):
    message = config_error(write(tmp_path, text, "bad.yaml"))
    assert message.startswith(f"{tmp_path / 'bad.yaml'}: "), message
    for needle in needles:
        assert needle in message, (needle, message)


def test_unknown_key_lists_every_known_key(tmp_path):
    message = config_error(None, ["lora_rank=8"])
    listed = message.split("known keys: ", 1)[1].rstrip(")").split(", ")
    assert listed == sorted(TrainConfig.model_fields)


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["lora_r=0"], ["lora_r", "got 0"]),
        (["lora_dropout=1.5"], ["lora_dropout", "got 1.5"]),
        (["lr_scheduler_type=bogus"], ["lr_scheduler_type", "'bogus'"]),
        (["cutoff_len=-1"], ["cutoff_len", "got -1"]),
        (["batch_size=6", "micro_batch_size=4"], ["batch_size (6)", "micro_batch_size (4)"]),
        (["load_in_8bit=true", "load_in_4bit=true"], ["load_in_8bit", "load_in_4bit"]),
        (["lora_r"], ["override 'lora_r' is not key=value"]),
        (["learning_rate=fast"], ["learning_rate", "'fast'"]),
    ],
)
def test_invalid_override_names_key(overrides, needles):
    message = config_error(None, overrides)
    for needle in needles:
        assert needle in message, (needle, message)


def test_override_error_names_the_config_file(tmp_path):
    message = config_error(write(tmp_path, FINETUNE_YML), ["lora_r=0"])
    assert message.startswith(f"{tmp_path / 'finetune.yml'}: lora_r: "), message


def test_missing_and_non_utf8_config_files(tmp_path):
    assert "config file not found" in config_error(tmp_path / "nope.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("output_dir: café\n".encode("latin-1"))
    assert config_error(bad) == f"{bad}: not valid UTF-8 text"


# ---- documentation and helpers ------------------------------------------------------------------


def test_config_help_mentions_every_field():
    text = config_help()
    lines = text.splitlines()
    assert len(lines) == len(TrainConfig.model_fields)
    for name, field in TrainConfig.model_fields.items():
        line = next((x for x in lines if x.startswith(f"{name} (default ")), None)
        assert line is not None, name
        assert field.description and field.description in line, name


@pytest.mark.parametrize(
    "val_set_size, n, expected",
    [
        (0, 1000, 0),
        (0.1, 1000, 100),  # a fraction of the examples
        (0.05, 10, 1),  # a fraction never rounds down to no validation at all
        (0.5, 3, 2),
        (1, 1000, 1),  # 1 is a count, not 100 %
        (2000, 10_000, 2000),  # a count
        (2000, 100, 2000),  # a count is not capped here: the trainer reports it leaves no training data
    ],
)
def test_val_count_fraction_or_count(val_set_size, n, expected):
    assert TrainConfig(val_set_size=val_set_size).val_count(n) == expected


# ---- rules across keys: all in TrainConfig, so CLI, UI and API refuse alike ----------------------


def test_data_path_is_required_to_train_only(tmp_path):
    # a config without data (form defaults, a template) is a config; a training run needs one
    assert TrainConfig().data_path == ""
    assert load_config(None, for_training=False).data_path == ""
    message = config_error(write(tmp_path, "lora_r: 16\n", "nodata.yaml"))
    assert message == f"{tmp_path / 'nodata.yaml'}: data_path: required (a .json, .jsonl, .csv or .parquet file)"
    assert (
        config_error(None, ["data_path= "]) == "config: data_path: required (a .json, .jsonl, .csv or .parquet file)"
    )
    with pytest.raises(ConfigError, match=r"^settings: data_path: required \("):
        TrainConfig().check_for_training("settings")
    cfg = TrainConfig(data_path="d.json")
    assert cfg.check_for_training() is cfg
    # a bad value is still reported first, by its own key
    assert "lora_r" in config_error(None, ["lora_r=0"])


@pytest.mark.parametrize(
    "overrides, line",
    [
        (
            ["early_stopping_patience=3"],
            (
                "config: early_stopping_patience (3) needs a validation set: set val_set_size (a count, or a fraction "
                "below 1) or early_stopping_patience=0"
            ),
        ),
        (
            ["val_set_size=0.1", "save_steps=30", "eval_steps=20"],
            (
                "config: save_steps (30) must be a multiple of eval_steps (20) "
                "so the best evaluation has a checkpoint; "
                "set only one of them (the other follows it), or load_best_model_at_end=false"
            ),
        ),
        (["batch_size=6", "micro_batch_size=4"], "config: batch_size (6) must be a multiple of micro_batch_size (4)"),
        (["load_in_8bit=true", "load_in_4bit=true"], "config: load_in_8bit and load_in_4bit: choose one"),
    ],
)
def test_rule_across_keys_is_one_line_naming_its_keys(overrides, line):
    assert config_error(None, ["data_path=d.json", *overrides]) == line


@pytest.mark.parametrize(
    "settings",
    [
        {"early_stopping_patience": 3, "val_set_size": 10},
        {"early_stopping_patience": 3, "val_set_size": 0.1},
        {"val_set_size": 10, "save_steps": 40, "eval_steps": 20},  # a multiple
        {"val_set_size": 10, "save_steps": 30, "eval_steps": 20, "load_best_model_at_end": False},
        {"val_set_size": 0, "save_steps": 30, "eval_steps": 20},  # no evaluation: nothing to align
    ],
)
def test_rules_accept_what_the_trainer_accepts(settings):
    TrainConfig(**settings)


@pytest.mark.parametrize(
    "settings, save_steps, eval_steps",
    [
        ({"val_set_size": 10}, 200, 200),  # neither set: the defaults align
        ({"val_set_size": 10, "save_steps": 30}, 30, 30),  # evaluation follows the save interval
        ({"val_set_size": 10, "eval_steps": 30}, 30, 30),  # checkpoints follow the eval interval
        ({"val_set_size": 10, "eval_steps": 50}, 50, 50),  # follows even where 200 would align
        ({"val_set_size": 0, "save_steps": 30}, 30, 30),  # the same without validation
        ({"val_set_size": 10, "save_steps": 60, "eval_steps": 20}, 60, 20),  # both set: kept as given
    ],
)
def test_unset_step_interval_follows_the_set_one(settings, save_steps, eval_steps):
    cfg = TrainConfig(**settings)
    assert (cfg.save_steps, cfg.eval_steps) == (save_steps, eval_steps)
    # what was set explicitly stays what the user set; the followed value is written out and reads back
    assert set(settings) == cfg.model_fields_set
    again = TrainConfig(**yaml.safe_load(dump_config(cfg)))
    assert (again.save_steps, again.eval_steps) == (save_steps, eval_steps)


def test_following_survives_assignment():
    cfg = TrainConfig(val_set_size=10)
    cfg.save_steps = 30  # eval_steps was never set: it follows
    assert (cfg.save_steps, cfg.eval_steps) == (30, 30)
    cfg.save_steps = 60
    assert (cfg.save_steps, cfg.eval_steps) == (60, 60)
    cfg.eval_steps = 20  # now both are explicit: kept as assigned
    assert (cfg.save_steps, cfg.eval_steps) == (60, 20)
    cfg.save_steps = 100  # 100 % 20 == 0
    assert (cfg.save_steps, cfg.eval_steps) == (100, 20)


def test_refused_assignment_changes_nothing():
    cfg = TrainConfig(val_set_size=10, eval_steps=20)
    assert cfg.save_steps == 20
    with pytest.raises(ValidationError, match=r"save_steps \(30\) must be a multiple of eval_steps \(20\)"):
        cfg.save_steps = 30  # both explicit now, and they conflict
    assert (cfg.save_steps, cfg.eval_steps) == (20, 20)
    assert cfg.model_fields_set == {"val_set_size", "eval_steps"}
    with pytest.raises(ValidationError, match="early_stopping_patience"):
        TrainConfig(val_set_size=10, early_stopping_patience=2).val_set_size = 0
    cfg = TrainConfig(batch_size=8, micro_batch_size=4)
    with pytest.raises(ValidationError, match="batch_size"):
        cfg.micro_batch_size = 3
    assert cfg.micro_batch_size == 4
    cfg.data_path = ""  # assignment has no training context: data_path stays optional here
    cfg.save_steps = 30
    assert cfg.eval_steps == 30


def test_config_help_states_the_rules():
    lines = {line.split(" ", 1)[0]: line for line in config_help().splitlines()}
    assert "Required to train" in lines["data_path"]
    assert "eval_steps = save_steps" in lines["eval_steps"] and "save_steps = eval_steps" in lines["save_steps"]
    assert "multiple of eval_steps" in lines["save_steps"]
    assert "val_set_size > 0" in lines["early_stopping_patience"]
    assert "multiple of micro_batch_size" in lines["batch_size"]
    assert "not with load_in_8bit" in lines["load_in_4bit"]
