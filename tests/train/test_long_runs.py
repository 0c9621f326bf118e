"""Training you can leave running: guards, stopping, schedules, monitoring, LoRA variants."""

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from test_recipe import cfg_for  # tests/train is on sys.path (rootdir import mode)

from lorakit.errors import ConfigError
from lorakit.train.callbacks import CHECKPOINT_MARKER, LossGuardCallback, read_train_log
from lorakit.train.recipe import LoraFinetune, train
from lorakit.train.trainer import TrainingDiverged, lora_norms


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tiny_model_dir, tmp_path):
    run = LoraFinetune(cfg_for(tiny_model_dir, tmp_path, max_steps=8, save_steps=2, val_set_size=0))
    run.check()
    run.setup_data()
    run.output_dir.mkdir(parents=True)
    run.setup_model()
    calls = {"n": 0}

    def poison(module, args, output):  # from the 5th forward pass on, the logits are NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 4 * run.grad_accum else output

    run.model.base_model.model.lm_head.register_forward_hook(poison)
    run.setup_trainer()
    with pytest.raises(TrainingDiverged, match=r"became nan at step 5.*checkpoint-4"):
        run.train()
    good = run.output_dir / "checkpoint-4"
    assert (good / CHECKPOINT_MARKER).is_file()
    weights = load_file(str(good / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (run.output_dir / "manifest.json").exists()


def test_loss_guard_warns_on_zero_loss_and_stops_at_loss(capsys):
    from transformers import TrainerControl, TrainerState

    guard = LossGuardCallback(zero_loss_warn_steps=3, stop_at_loss=0.5)
    state, control = TrainerState(), TrainerControl()
    for step in range(1, 4):
        state.global_step = step
        guard.on_log(None, state, control, logs={"loss": 0.0})
    assert "exactly 0 for 3 logs" in capsys.readouterr().err
    assert not control.should_training_stop
    guard.on_log(None, state, control, logs={"loss": 0.4})
    assert control.should_training_stop


def test_stop_at_loss_ends_the_run_and_saves(tiny_model_dir, tmp_path):
    manifest = train(cfg_for(tiny_model_dir, tmp_path, max_steps=10, stop_at_loss=100.0, val_set_size=0))
    assert manifest["training"]["global_steps"] == 1  # first log (logging_first_step) is below 100


def test_early_stopping_keeps_the_best_adapter(tiny_model_dir, tmp_path):
    manifest = train(
        cfg_for(
            tiny_model_dir,
            tmp_path,
            max_steps=40,
            learning_rate=1e-9,
            eval_steps=1,
            save_steps=1,
            early_stopping_patience=2,
            early_stopping_threshold=0.01,
            save_total_limit=2,
        )
    )
    t = manifest["training"]
    assert t["global_steps"] == 3  # steps 2 and 3 do not improve on step 1 by the 0.01 min delta
    evals = read_eval(tmp_path)
    best_step = min(evals, key=evals.get)  # the best checkpoint is the lowest eval loss (no delta)
    assert t["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert t["eval_loss"] == pytest.approx(evals[best_step], abs=1e-9)


def read_eval(tmp_path):
    return {r["step"]: r["eval_loss"] for r in read_train_log(tmp_path / "out") if "eval_loss" in r}


def test_early_stopping_needs_validation(tiny_model_dir, tmp_path):
    # the config itself refuses these, before any recipe, process or model exists
    with pytest.raises(ValidationError, match=r"early_stopping_patience \(2\) needs a validation set"):
        cfg_for(tiny_model_dir, tmp_path, val_set_size=0, early_stopping_patience=2)
    with pytest.raises(ValidationError, match=r"save_steps \(3\) must be a multiple of eval_steps \(2\)"):
        cfg_for(tiny_model_dir, tmp_path, save_steps=3, eval_steps=2)


@pytest.mark.parametrize(
    "scheduler", ["linear", "cosine", "constant", "constant_with_warmup", "inverse_sqrt", "polynomial"]
)
def test_schedulers(tiny_model_dir, tmp_path, scheduler):
    train(
        cfg_for(
            tiny_model_dir,
            tmp_path,
            max_steps=6,
            lr_scheduler_type=scheduler,
            warmup_steps=2,
            val_set_size=0,
            save_steps=100,
        )
    )
    lrs = [r["learning_rate"] for r in read_train_log(tmp_path / "out") if "learning_rate" in r]
    if scheduler == "constant":  # no warm-up by definition
        assert lrs == [pytest.approx(1e-2)] * len(lrs)
    else:
        assert lrs[0] < lrs[2]  # warm-up
    if scheduler in ("constant", "constant_with_warmup"):
        assert lrs[-1] == pytest.approx(1e-2)
    else:
        assert lrs[-1] < 1e-2


def test_tensorboard_has_the_scalars(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(cfg_for(tiny_model_dir, tmp_path, max_steps=4, eval_steps=2, save_steps=2))
    events = list((tmp_path / "out" / "runs").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for ev in events:
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for tag in [
        "train/loss",
        "eval/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/lora_A_norm",
        "train/lora_B_norm",
        "train/lora_BA_norm",
    ]:
        assert tag in tags, (tag, sorted(tags))
    per_layer = {t for t in tags if t.startswith("lora_norms/")}
    # 2 layers x (q_proj, v_proj) x (A, B, BA)
    assert len(per_layer) == 12, sorted(per_layer)
    assert "lora_norms/model.layers.0.self_attn.q_proj/BA" in per_layer


def test_lora_update_norm_matches_dense_product(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    norms = lora_norms(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    dense = 2.0 * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    assert norms["model.layers.0.self_attn.q_proj"][2] == pytest.approx(float(dense.norm()), rel=1e-4)


@pytest.mark.parametrize(
    "settings,check",
    [
        ({"use_rslora": True}, lambda c, w: c["use_rslora"] is True),
        ({"use_dora": True}, lambda c, w: c["use_dora"] is True and any("lora_magnitude_vector" in k for k in w)),
        (
            {"rank_pattern": {"layers\\.0\\.self_attn\\.q_proj": 16}, "alpha_pattern": {"v_proj": 4}},
            lambda c, w: (
                w["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 16
                and w["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 8
                and c["alpha_pattern"] == {"v_proj": 4}
            ),
        ),
        ({"lora_bias": "lora_only"}, lambda c, w: c["bias"] == "lora_only"),
        ({"modules_to_save": ["lm_head"]}, lambda c, w: any("lm_head" in k for k in w)),
        (
            {"lora_target_modules": r".*layers\.1\.mlp\.(up|down)_proj"},
            lambda c, w: (
                {k.split(".")[-3] for k in w} == {"up_proj", "down_proj"} and all(".layers.1." in k for k in w)
            ),
        ),
    ],
)
def test_lora_variants(tiny_model_dir, tmp_path, settings, check):
    train(cfg_for(tiny_model_dir, tmp_path, max_steps=2, val_set_size=0, save_steps=100, **settings))
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert check(adapter_config, weights), (adapter_config, sorted(weights))


def test_bad_patterns_fail_in_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="regular expression .* matches no linear module"):
        LoraFinetune(cfg_for(tiny_model_dir, tmp_path, lora_target_modules=r"nothing\..*")).run()
    with pytest.raises(ConfigError, match="rank_pattern: 'k_proj' matches no adapted module"):
        LoraFinetune(cfg_for(tiny_model_dir, tmp_path, rank_pattern={"k_proj": 4})).run()


def test_packed_training_matches_padded(tiny_model_dir, tmp_path):
    """Same examples, same steps: packing changes the batch layout, not what is learned."""
    common = dict(
        max_steps=3,
        val_set_size=4,
        save_steps=100,
        eval_steps=100,
        lora_dropout=0.0,
        learning_rate=1e-3,
        load_best_model_at_end=False,
    )
    padded = train(cfg_for(tiny_model_dir, tmp_path / "a", output_dir=str(tmp_path / "a" / "out"), **common))
    packed = train(
        cfg_for(tiny_model_dir, tmp_path / "b", output_dir=str(tmp_path / "b" / "out"), packing=True, **common)
    )
    assert packed["training"]["train_loss"] == pytest.approx(padded["training"]["train_loss"], abs=1e-4)
    assert packed["training"]["eval_loss"] == pytest.approx(padded["training"]["eval_loss"], abs=1e-4)
    a = load_file(str(tmp_path / "a" / "out" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


@pytest.mark.parametrize("settings", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}])
def test_bf16_base_trains_fp32_weights_for_every_variant(tiny_model_dir, tmp_path, settings):
    manifest = train(
        cfg_for(tiny_model_dir, tmp_path, precision="bf16", max_steps=2, val_set_size=0, save_steps=100, **settings)
    )
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert manifest["verification"]["max_logit_diff"] <= 1e-4
