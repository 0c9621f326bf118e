"""The config reader against any YAML (or JSON) file and any key=value overrides: it returns a
TrainConfig that survives its own record (dump_config, read back) and that the trainer takes, or
raises one ConfigError line naming the file (or "config" for overrides alone) and the key."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
from fuzzing import any_text, dumps, json_values, mutated, nested_json, some_text, text_of, user_error_line
from hypothesis import example, given
from hypothesis import strategies as st

from lorakit.config import TrainConfig, dump_config, load_config, parse_override
from lorakit.errors import ConfigError, LorakitError

KEYS = sorted(TrainConfig.model_fields)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config")


# ---- values as YAML writes them ----------------------------------------------------------

yaml_scalar_text = st.one_of(
    st.sampled_from(
        [
            "0", "-1", "1", "8", "0.5", "3e-4", "1e400", ".inf", "-.inf", ".nan", "true", "no", "null", "~", "''",
            "2024-01-01", "2024-13-01", "0000-01-01", "0x" + "f" * 5000, "1" * 5000, "0o17", "1_000", "[]", "{}",
            "[q_proj, v_proj]", "all-linear", ".*proj", "(", "a{99999999999}", "!!python/object:os.system x",
            "&a [1, *a]", "*unknown", "|\n  text", "'a\\nb'", '"\\ud800"', "\x00", "\x85", "\ufeff", "\t",
        ]
    ),
    st.integers().map(str),
    st.floats().map(str),
    text_of("[]{}:,-'\"&*!|>%@`#?0aZ .\t\n\\", 0, 12),
    any_text,
)  # fmt: skip


@st.composite
def yaml_file(draw) -> bytes:
    how = draw(st.sampled_from(["keys", "dump", "json", "nested", "bytes", "text", "aliases"]))
    if how == "keys":  # key: value lines as a person writes them
        lines = [
            f"{draw(st.sampled_from(KEYS) | some_text)}: {draw(yaml_scalar_text)}"
            for _ in range(draw(st.integers(0, 6)))
        ]
        data = "\n".join(lines).encode("utf-8", "surrogatepass")
    elif how == "dump":  # any mapping, YAML-dumped (keys that are numbers, null, lists...)
        value = draw(
            st.dictionaries(
                st.sampled_from(KEYS) | st.integers() | st.none() | st.booleans() | some_text,
                json_values(max_leaves=6),
                max_size=5,
            )
            | json_values()
        )
        data = yaml.safe_dump(value, allow_unicode=draw(st.booleans())).encode("utf-8", "surrogatepass")
    elif how == "json":  # a config file may be JSON
        data = dumps(draw(st.dictionaries(st.sampled_from(KEYS), json_values(max_leaves=4), max_size=5)), True)
    elif how == "nested":
        data = draw(nested_json(max_depth=1500))  # past the recursion limit; PyYAML is slow on deeper
    elif how == "aliases":  # anchors and aliases: shared and nested values
        n = draw(st.integers(1, 12))
        lines = ["a0: &a0 [x, x]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, n)]
        lines.append(f"{draw(st.sampled_from(KEYS))}: *a{n - 1}")
        data = "\n".join(lines).encode()
    elif how == "text":
        data = draw(any_text).encode("utf-8", "surrogatepass")
    else:
        data = draw(st.binary(max_size=200))
    return draw(mutated(data))


override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS) | some_text, yaml_scalar_text),
    any_text,  # no "=" at all, or one in an odd place
)


# ---- the property ------------------------------------------------------------------------


def check_config(path: Path | None, overrides: list[str]) -> TrainConfig | None:
    source = str(path) if path is not None else "config"
    try:
        cfg = load_config(path, overrides, for_training=False)
    except LorakitError as e:
        message = user_error_line(e)
        assert isinstance(e, ConfigError), message
        override = message.startswith("override ") and message.endswith(" is not key=value")
        assert message.startswith(f"{source}: ") or override, message
        return None
    check_valid(cfg)
    return cfg


def check_valid(cfg: TrainConfig) -> None:
    """What the trainer and its records need of an accepted config."""
    for name, value in cfg.model_dump().items():
        for v in value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]:
            if isinstance(v, float):
                assert math.isfinite(v), (name, v)
            if isinstance(v, int):
                assert -(2**63) <= v < 2**63, name
    assert 0 <= cfg.seed < 2**32  # numpy's and transformers' set_seed range
    for key in [*cfg.rank_pattern, *cfg.alpha_pattern]:  # as peft matches them
        re.compile(rf"(.*\.)?({key})$")
    if isinstance(cfg.lora_target_modules, str) and cfg.lora_target_modules != "all-linear":
        re.compile(cfg.lora_target_modules)
    # the run folder records the config (lorakit_config.yaml); reading the record gives it back
    text = dump_config(cfg)
    again = TrainConfig(**yaml.safe_load(text))
    assert again.model_dump() == cfg.model_dump()


@given(data=yaml_file(), overrides=st.lists(override, max_size=3))
@example(data=b"[" * 1500 + b"]" * 1500, overrides=[])  # RecursionError from PyYAML
@example(data=b"seed: " + b"1" * 5000, overrides=[])  # ValueError: int digit limit
@example(data=b"seed: 0x" + b"f" * 5000, overrides=[])  # accepted, then dump_config's ValueError
@example(data=b"lora_dropout: 0x" + b"f" * 5000, overrides=[])  # repr() of the value in the message
@example(data=b"a: 2024-13-01", overrides=[])  # ValueError: month must be in 1..12
@example(data=b"1: 2", overrides=[])  # TypeError: keywords must be strings
@example(data=b"null: x", overrides=[])
@example(data=b"val_set_size: .inf", overrides=[])  # OverflowError in the val_set_size check
@example(data=b"num_epochs: .inf\nalpha_pattern: {a: .nan}", overrides=[])  # accepted before
@example(data=b"seed: -1", overrides=[])  # accepted, then transformers' set_seed ValueError
@example(data=b"a: \x00", overrides=[])  # a ReaderError: its text has two lines
@example(data=b"lora_target_modules: '" + b"(" * 1000 + b"a" + b")" * 1000 + b"'", overrides=[])  # RecursionError
@example(data=b"lora_target_modules: 'a{99999999999}'", overrides=[])  # OverflowError from re
@example(data=b"rank_pattern: {'(': 4}", overrides=[])  # accepted, then peft's re.error in training
@example(data=b"rank_pattern: {a: 0}", overrides=[])  # accepted, then peft's "r should be positive"
@example(data=b"x: &a [1, 2]\nlora_target_modules: [*a, *a]", overrides=[])
def test_config_file(data, overrides, folder):
    path = folder / "config.yaml"
    path.write_bytes(data)
    check_config(path, overrides)


@given(overrides=st.lists(override, max_size=4))
@example(overrides=["val_set_size=.inf"])
@example(overrides=["seed=" + "[" * 1500])
@example(overrides=["seed=" + "1" * 5000])
@example(overrides=["seed=0x" + "f" * 5000])
@example(overrides=["warmup_steps=2024-13-01"])
@example(overrides=["lora_target_modules=" + "(" * 1000 + "a" + ")" * 1000])
@example(overrides=["output_dir=0123", "wandb_log_model=true"])
def test_overrides(overrides):
    cfg = check_config(None, overrides)
    for item in overrides:
        if "=" in item and cfg is not None:
            key, _ = parse_override(item)
            assert key in cfg.model_fields_set


@given(name=text_of("ab.-_ \x00é/", 1, 8) | st.just("x" * 300 + ".yaml"))
def test_config_file_names(name, folder):
    try:
        load_config(folder / name, for_training=False)
    except LorakitError as e:
        user_error_line(e, path=folder / name)


def test_messages_name_file_and_key(folder):
    """The regressions above, with the exact lines a user sees."""
    cases = {
        b"[" * 1500: "invalid YAML: lists or mappings nested too deeply",
        b"seed: " + b"1" * 5000: "invalid YAML: a number with more than 4300 digits",
        b"seed: 0x" + b"f" * 5000: "seed: Input should be less than or equal to 4294967295 (got a 20000-bit number)",
        b"cutoff_len: 0x" + b"f" * 20: "a number too large (more than 64 bits)",
        b"a: 2024-13-01": "invalid YAML: month must be in 1..12",
        b"1: 2": "unknown key '1' (known keys: ",
        b"val_set_size: .inf": "val_set_size: Input should be a finite number (got inf)",
        b"seed: -1": "seed: Input should be greater than or equal to 0 (got -1)",
        b"a: \x00": "invalid YAML: unacceptable character #x0000: special characters are not allowed",
        b"lora_target_modules: 'a{99999999999}'": "lora_target_modules: not a valid regular expression",
        b"rank_pattern: {'(': 4}": "rank_pattern: key '(': not a valid regular expression",
        b"rank_pattern: {a: 0}": "rank_pattern: key 'a': a rank must be at least 1, got 0",
        b"output_dir: " + b"x" * 1000 + b"\nlora_r: [" + b"y" * 1000 + b"]": "lora_r: Input should be a valid integer",
    }
    path = folder / "c.yaml"
    for data, needle in cases.items():
        path.write_bytes(data)
        with pytest.raises(ConfigError) as info:
            load_config(path, for_training=False)
        message = user_error_line(info.value, f"{path}: ", needle)
        assert len(message) < len(str(path)) + 1200, message  # a long bad value is shortened
