"""Adapter folders against damage: truncated or random safetensors, tensors of other shapes,
an adapter_config.json that is not JSON, has wrong types, huge ranks or names another base,
symlinks pointing outside or nowhere, missing files, a broken template record.

check_adapter_dir, which generate, chat, eval, serve, merge and export call before any model
loads, returns the folder or raises one LorakitError line naming it. When it passes, load_adapter
(onto the tiny model, loaded once per module) returns the PeftModel or raises one ModelError
line, and then leaves the model exactly as it was: no half-injected LoRA layer, no adapter
half-added beside the ones already loaded."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from fuzzing import (
    default_run_share,
    dumps,
    fresh_dir,
    json_values,
    long_number,
    mutated,
    nested_json,
    some_text,
    user_error_line,
)
from hypothesis import event, example, given
from hypothesis import strategies as st
from random_adapter import make_random_adapter

from lorakit.data.templates import PromptTemplate, resolve_template
from lorakit.errors import LorakitError
from lorakit.infer.adapters import base_model_of, check_adapter_dir, load_adapter, unload_adapter
from lorakit.runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_RECORD, INT8_WEIGHTS, MANIFEST, TEMPLATE_RECORD

# peft warns about each unknown config key and missing weight it meets; the fuzzer makes thousands
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

KEYS = [
    "r", "lora_alpha", "target_modules", "peft_type", "task_type", "base_model_name_or_path", "rank_pattern",
    "alpha_pattern", "bias", "lora_dropout", "modules_to_save", "use_dora", "fan_in_fan_out", "layers_to_transform",
    "init_lora_weights", "inference_mode", "use_rslora", "exclude_modules", "revision",
]  # fmt: skip


GOOD_TEMPLATE = {"prompt_input": "{instruction} {input}:", "prompt_no_input": "{instruction}:", "response_split": ":"}


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory):
    """A good float adapter, its int8 twin, and their bytes."""
    from lorakit.infer.quantize import quantize_adapter

    root = tmp_path_factory.mktemp("fuzz-adapter-sources")
    good = make_random_adapter(tiny_model_dir, root / "good")
    int8 = root / "int8"
    quantize_adapter(good, int8)
    return _Quiet(
        root=root,
        good=good,
        config=json.loads((good / ADAPTER_CONFIG).read_text()),
        float=(good / ADAPTER_WEIGHTS).read_bytes(),
        int8=(int8 / INT8_WEIGHTS).read_bytes(),
    )


class _Quiet(dict):
    """Shown as a name where hypothesis prints the strategies it drew from (not 20 kB of bytes)."""

    def __repr__(self) -> str:
        return "sources"


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-adapters")


# ---- a folder, described; built for each example ----------------------------------------


@st.composite
def configs(draw, good: dict) -> bytes:
    how = draw(st.sampled_from(["good"] * 5 + ["keys"] * 4 + ["rank"] * 2 + ["any", "nested", "number", "bytes"]))
    config = dict(good)
    if how == "keys":
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(KEYS) | some_text)
            if draw(st.integers(0, 3)) == 0:
                config.pop(key, None)
            else:
                config[key] = draw(json_values(max_leaves=4))
    elif how == "rank":  # ranks of any size: the weights are r=4
        config["r"] = draw(st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, 3, 4, 5, 64, 65, 10**8]))
        if draw(st.booleans()):
            config["rank_pattern"] = draw(st.dictionaries(some_text, st.integers(-5, 10**9), max_size=2))
    elif how == "any":
        return dumps(draw(json_values()), True)
    elif how == "nested":
        return draw(nested_json())
    elif how == "number":
        return draw(long_number())
    elif how == "bytes":
        return draw(st.binary(max_size=100))
    data = dumps(config, draw(st.booleans()))
    return draw(mutated(data)) if draw(st.integers(0, 9)) == 0 else data


def _safetensors(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


@st.composite
def weights(draw, good: bytes) -> bytes:
    how = draw(st.sampled_from(["good"] * 6 + ["damaged", "header", "shapes", "shapes", "bytes", "empty"]))
    if how == "good":
        return good
    if how == "damaged":  # cut short, bytes changed or inserted
        return draw(mutated(good))
    if how == "header":  # a byte of the JSON header changed
        header_len = int.from_bytes(good[:8], "little")
        i = draw(st.integers(0, min(len(good), 8 + header_len) - 1))
        return good[:i] + bytes([good[i] ^ draw(st.integers(1, 255))]) + good[i + 1 :]
    if how == "shapes":  # the adapter's own tensor names with other shapes and dtypes
        names = draw(
            st.lists(
                st.sampled_from(
                    [
                        f"base_model.model.model.layers.{layer}.self_attn.{m}_proj.lora_{ab}.weight"
                        for layer in (0, 1, 5)
                        for m in ("q", "v", "k")
                        for ab in ("A", "B")
                    ]
                    + ["lora_A.weight", "other", "base_model.model.lm_head.weight"]
                ),
                max_size=8,
                unique=True,
            )
        )
        dim = st.integers(0, 70)
        dtype = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool])
        tensors = {}
        for name in names:
            shape = draw(st.lists(dim, min_size=0, max_size=3))
            tensors[name] = torch.zeros(shape, dtype=draw(dtype))
            if tensors[name].is_floating_point() and tensors[name].numel() and draw(st.booleans()):
                tensors[name].fill_(draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.5, 6e4])))
        return _safetensors(tensors)
    if how == "empty":
        return _safetensors({})
    return draw(st.binary(max_size=200))


@st.composite
def folders(draw, sources: dict) -> dict:
    int8 = draw(st.booleans())
    spec = {
        "config": draw(configs(sources["config"])),
        "weights": draw(weights(sources["int8"] if int8 else sources["float"])),
        "weights_name": INT8_WEIGHTS if int8 else ADAPTER_WEIGHTS,
        "layout": draw(
            st.sampled_from(
                ["plain"] * 24
                + ["no-config", "no-weights", "pickle-only", "weights-dir", "config-dir", "a-file", "missing"]
                + ["link-weights-out", "link-config-out", "link-dangling", "link-loop", "link-folder", "link-devnull"]
            )
        ),
        "template": draw(
            st.sampled_from([None] * 12 + [b'{"name": "x"}', b"[", b"{}", json.dumps(GOOD_TEMPLATE).encode(), "bytes"])
        ),
        "manifest": draw(st.sampled_from([None] * 12 + ["types", "long", "nested"])),
        "config_record": draw(st.sampled_from([None] * 12 + ["name", "nested", "bytes"])),
    }
    if spec["template"] == "bytes":
        spec["template"] = draw(st.binary(max_size=30))
    if spec["manifest"] == "types":
        keys = ("base_model", "base_model_path")
        spec["manifest"] = draw(st.fixed_dictionaries({k: json_values(max_leaves=2) for k in keys}))
    elif spec["manifest"] == "long":  # a base model name longer than the file system takes
        spec["manifest"] = {"base_model": "x" * draw(st.integers(250, 5000))}
    elif spec["manifest"] == "nested":
        spec["manifest"] = draw(nested_json(max_depth=5000))
    if spec["config_record"] == "name":  # the run's lorakit_config.yaml names the template
        name = draw(some_text | st.sampled_from(["alpaca", "chat", "/etc/passwd", "../x.json", "[1]", "{a: 1}"]))
        spec["config_record"] = f"prompt_template_name: {json.dumps(name)}\n".encode("utf-8", "surrogatepass")
    elif spec["config_record"] == "nested":
        spec["config_record"] = b"prompt_template_name: " + draw(nested_json(max_depth=1500))
    elif spec["config_record"] == "bytes":
        spec["config_record"] = draw(st.binary(max_size=40))
    return spec


def build(spec: dict, work: Path, sources: dict) -> Path:
    folder = fresh_dir(work / "case") / "adapter"
    outside = fresh_dir(work / "outside")
    layout = spec["layout"]
    if layout == "a-file":
        folder.write_bytes(b"not a folder")
        return folder
    if layout == "missing":
        return folder
    if layout == "link-folder":  # the folder itself a symlink to one outside
        real = outside / "real"
        real.mkdir()
        folder.symlink_to(real)
        folder = real
    else:
        folder.mkdir()
    config, weights = folder / ADAPTER_CONFIG, folder / spec["weights_name"]
    if layout != "no-config":
        if layout == "config-dir":
            config.mkdir()
        elif layout == "link-config-out":
            (outside / "c.json").write_bytes(spec["config"])
            config.symlink_to(outside / "c.json")
        else:
            config.write_bytes(spec["config"])
    if layout == "pickle-only":
        (folder / "adapter_model.bin").write_bytes(b"a pickle that must never be unpickled")
    elif layout == "weights-dir":
        weights.mkdir()
    elif layout == "link-weights-out":
        (outside / "w.safetensors").write_bytes(spec["weights"])
        weights.symlink_to(outside / "w.safetensors")
    elif layout == "link-dangling":
        weights.symlink_to(outside / "nothing-here")
    elif layout == "link-loop":
        weights.symlink_to(weights)
    elif layout == "link-devnull":
        weights.symlink_to(os.devnull)
    elif layout != "no-weights":
        weights.write_bytes(spec["weights"])
    if spec["template"] is not None:
        (folder / TEMPLATE_RECORD).write_bytes(spec["template"])
    if spec["manifest"] is not None:
        manifest = spec["manifest"]
        (folder / MANIFEST).write_bytes(manifest if isinstance(manifest, bytes) else dumps(manifest, True))
    if spec.get("config_record") is not None:
        (folder / CONFIG_RECORD).write_bytes(spec["config_record"])
    return work / "case" / "adapter"


# ---- the property ------------------------------------------------------------------------


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, reference: dict) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules()), "LoRA layers left in the model"
    assert not hasattr(model, "peft_config")
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def checked(folder: Path) -> bool:
    try:
        check_adapter_dir(folder)
    except LorakitError as e:
        user_error_line(e, str(folder.parent), path=folder)
        event("refused before the model loads")
        return False
    return True


@given(data=st.data())
def test_adapter_folder(data, sources, base, work):
    spec = data.draw(folders(sources))
    folder = build(spec, work, sources)
    if not checked(folder):
        return
    # what generate does before the model loads: the recorded base and template are usable
    template = resolve_template(adapter=folder)
    assert isinstance(template, PromptTemplate)
    model = copy.deepcopy(base)
    reference = _state(model)
    try:
        peft_model = load_adapter(model, folder, "fuzzed")
    except LorakitError as e:
        user_error_line(e, str(folder.parent))
        assert_untouched(model, reference)
        event("refused by load_adapter")
        return
    assert list(peft_model.peft_config) == ["fuzzed"] and base_model_of(peft_model) is model
    event("loaded")


@pytest.fixture(scope="module")
def served(base, sources):
    """A PeftModel holding one good adapter, as lorakit serve keeps it, and its logits."""
    model = load_adapter(copy.deepcopy(base), sources["good"], "good")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return model, ids, logits


@default_run_share(0.4)
@given(data=st.data())
def test_adapter_beside_a_loaded_one(data, sources, served, work):
    """A bad adapter loaded beside a good one (the server's POST /v1/adapters) leaves the good
    one loaded, active and answering exactly as before."""
    model, ids, logits = served
    modules = sum(1 for _ in model.modules())
    spec = data.draw(folders(sources))
    folder = build(spec, work, sources)
    if not checked(folder):
        return
    try:
        load_adapter(model, folder, "beside")
    except LorakitError as e:
        user_error_line(e, str(folder.parent))
        event("refused by load_adapter")
    else:
        unload_adapter(model, "beside")
        event("loaded")
    assert list(model.peft_config) == ["good"] and model.active_adapter == "good"
    assert sum(1 for _ in model.modules()) == modules  # nothing left wrapped (it nested per failure)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_failed_loads_beside_a_loaded_one_leave_no_wrappers(sources, served, work):
    """Found by the long run: modules_to_save [''] beside a loaded adapter made peft wrap modules and
    fail; the wrappers stayed, one level deeper with every failed load, until the model's module
    tree was thousands deep."""
    model, ids, logits = served
    modules = sum(1 for _ in model.modules())
    config = {**sources["config"], "modules_to_save": [""]}
    spec = {"config": json.dumps(config).encode(), "weights": sources["float"], "weights_name": ADAPTER_WEIGHTS}
    spec |= {"layout": "plain", "template": None, "manifest": None, "config_record": None}
    for _ in range(3):
        with pytest.raises(LorakitError):
            load_adapter(model, build(spec, work, sources), "beside")
        assert sum(1 for _ in model.modules()) == modules
    assert list(model.peft_config) == ["good"] and model.active_adapter == "good"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


# ---- the regressions, one by one -------------------------------------------------------------


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"weights": b"\x00garbage" * 10}, "is not a readable safetensors file"),  # SafetensorError; LoRA left in
        ({"weights": "half"}, "is not a readable safetensors file"),
        ({"weights": b""}, "is not a readable safetensors file"),
        ({"config": b"[" * 100_000}, "nested too deeply"),  # RecursionError
        ({"config": b'{"r": ' + b"1" * 5000 + b"}"}, "a number with more than 4300 digits"),
        ({"config": b"[]"}, "a JSON object is needed"),
        ({"r": 10**8}, "'r' is 100000000, above every dimension of the LoRA matrices"),  # would take ~100 GB
        ({"r": "abc"}, "'r' must be a positive whole number"),
        ({"rank_pattern": {"q_proj": 10**9}}, "rank_pattern['q_proj'] is 1000000000"),
        ({"base_model_name_or_path": 5}, "'base_model_name_or_path' must be a string"),  # generate's TypeError
        ({"bias": "weird"}, "does not fit base model"),  # peft failed halfway: LoRA layers were left in
        ({"template": b'{"name": "x"}'}, "missing or non-string key 'prompt_input'"),  # KeyError in generate
        ({"manifest": {"base_model": ["x"]}}, "'base_model' must be a string"),  # TypeError in generate
        ({"manifest": {"base_model": "x" * 300}}, "recorded base model is no usable path"),  # OSError
        ({"manifest": b"[" * 100_000}, "its manifest is nested too deeply"),  # RecursionError in runfolder
        ({"config_record": b"prompt_template_name: " + b"[" * 1500}, "nested too deeply"),  # ditto
        # found by the long run: peft wrapped the decoder's ModuleList as a module to save, failed,
        # and its unload could not take the wrapper back out: LoRA layers left in the shared base
        ({"modules_to_save": {"": None}}, "does not fit base model"),
        ({"modules_to_save": [""]}, "does not fit base model"),
        ({"modules_to_save": ["layers"]}, "does not fit base model"),
        # found by the long run: keys peft compiles as regular expressions (re.error, a traceback)
        ({"rank_pattern": {")": 1}}, "rank_pattern key ')' is not a valid pattern"),
        ({"rank_pattern": {"+": 1}}, "rank_pattern key '+' is not a valid pattern"),
        ({"alpha_pattern": {"?": 2}}, "alpha_pattern key '?' is not a valid pattern"),
        ({"target_modules": "q_proj("}, "does not fit base model"),  # a string is a pattern too
    ],
)
def test_regressions(change, needle, sources, base, work):
    spec = {
        "config": json.dumps(sources["config"]).encode(),
        "weights": sources["float"],
        "weights_name": ADAPTER_WEIGHTS,
        "layout": "plain",
        "template": None,
        "manifest": None,
        "config_record": None,
    }
    for key, value in change.items():
        if key in spec:
            spec[key] = sources["float"][: len(sources["float"]) // 2] if value == "half" else value
        else:
            spec["config"] = json.dumps({**sources["config"], key: value}).encode()
    folder = build(spec, work, sources)
    model = copy.deepcopy(base)
    reference = _state(model)
    with pytest.raises(LorakitError) as info:
        load_adapter(model, folder, "x")
    user_error_line(info.value, str(folder), needle)
    assert_untouched(model, reference)


@example(spec={"r": 4})
@given(spec=st.fixed_dictionaries({"r": st.integers(1, 64) | st.sampled_from([10**6, 2**31])}))
def test_rank_of_the_file_loads(spec, sources, base, work):
    """Only the rank the weights have loads; others are one line, never an allocation."""
    folder = fresh_dir(work / "rank") / "adapter"
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**sources["config"], **spec}))
    (folder / ADAPTER_WEIGHTS).write_bytes(sources["float"])
    model = copy.deepcopy(base)
    try:
        load_adapter(model, folder, "x")
    except LorakitError as e:
        assert spec["r"] != 4
        user_error_line(e, str(folder))
    else:
        assert spec["r"] == 4
