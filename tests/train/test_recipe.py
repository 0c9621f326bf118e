"""Training on a tiny random Llama: outputs, verification, atomic save, guards."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.config import TrainConfig
from lorakit.errors import ConfigError
from lorakit.train import save as save_mod
from lorakit.train.callbacks import read_train_log
from lorakit.train.recipe import LoraFinetune, train
from lorakit.train.save import AdapterVerificationError, verify_adapter


def make_data(folder, n=24):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.json"
    path.write_text(
        json.dumps([{"instruction": f"What is {i} plus {i}?", "input": "", "output": str(2 * i)} for i in range(n)])
    )
    return path


def cfg_for(model_dir, tmp_path, **kw):
    base = dict(
        base_model=str(model_dir),
        data_path=str(make_data(tmp_path)),
        output_dir=str(tmp_path / "out"),
        batch_size=4,
        micro_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=2,
        eval_steps=2,
        val_set_size=4,
        precision="fp32",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_a_verified_adapter(tiny_model_dir, tmp_path):
    manifest = train(cfg_for(tiny_model_dir, tmp_path))
    out = tmp_path / "out"
    for name in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "lorakit_config.yaml",
        "lorakit_template.json",
        "manifest.json",
        "train_log.jsonl",
    ]:
        assert (out / name).is_file(), name
    saved = json.loads((out / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(manifest))
    assert saved["world_size"] == 1 and saved["template"] == "alpaca"
    assert Path(saved["base_model_path"]).is_absolute()
    assert saved["data"]["train_examples"] == 20 and saved["data"]["val_examples"] == 4
    assert len(saved["data"]["sha256"]) == 64
    assert saved["training"]["global_steps"] == 4
    assert saved["verification"]["max_logit_diff"] <= 1e-4
    assert {"torch", "transformers", "peft"} <= set(saved["libraries"])
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert len(weights) == 2 * 2 * 2  # 2 layers x (q,v) x (A,B)
    assert any(float(t.abs().max()) > 0 for n, t in weights.items() if "lora_B" in n)
    log = read_train_log(out)
    assert any("loss" in r for r in log) and any("eval_loss" in r for r in log)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.glob(".saving-*"))


def test_loss_falls_on_a_learnable_task(tiny_model_dir, tmp_path):
    manifest = train(
        cfg_for(
            tiny_model_dir,
            tmp_path,
            max_steps=30,
            val_set_size=0,
            logging_steps=1,
            learning_rate=5e-2,
            lr_scheduler_type="constant",
            save_steps=100,
            lora_target_modules="all-linear",
        )
    )
    losses = [r["loss"] for r in read_train_log(tmp_path / "out") if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses  # a random 2-layer model learns slowly
    assert manifest["lora"]["target_modules"] == "all-linear"


def test_failed_verification_leaves_no_adapter(tiny_model_dir, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise AdapterVerificationError("simulated: logits differ")

    monkeypatch.setattr(save_mod, "verify_adapter", broken)
    with pytest.raises(AdapterVerificationError):
        train(cfg_for(tiny_model_dir, tmp_path))
    out = tmp_path / "out"
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".saving-*"))


def test_untrained_adapter_is_reported_empty(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterVerificationError, match="lora_B weight is zero"):
        verify_adapter(model, tmp_path / "a", torch.tensor([[1, 2, 3]]))


def test_config_errors_before_model_load(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="no module named nope; it has .*q_proj"):
        LoraFinetune(cfg_for(tiny_model_dir, tmp_path, lora_target_modules=["q_proj", "nope"])).run()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        LoraFinetune(cfg_for(tiny_model_dir, tmp_path, resume_from_checkpoint=True)).check()
    with pytest.raises(ConfigError, match="load_in_4bit"):
        LoraFinetune(cfg_for(tiny_model_dir, tmp_path, load_in_4bit=True)).check()


def test_output_dir_guard_and_resume(tiny_model_dir, tmp_path):
    train(cfg_for(tiny_model_dir, tmp_path))
    with pytest.raises(ConfigError, match="already holds a trained adapter"):
        LoraFinetune(cfg_for(tiny_model_dir, tmp_path)).check()
    # resume from the last checkpoint and go further
    manifest = train(cfg_for(tiny_model_dir, tmp_path, max_steps=6, resume_from_checkpoint=True))
    assert manifest["training"]["global_steps"] == 6


def test_relative_base_model_is_found_from_another_directory(tiny_model_dir, tmp_path, monkeypatch):
    from lorakit.infer.generate import recorded_base_model

    monkeypatch.chdir(tiny_model_dir.parent)
    train(cfg_for(tiny_model_dir.name, tmp_path))
    monkeypatch.chdir(tmp_path)
    assert Path(recorded_base_model(tmp_path / "out")) == tiny_model_dir.resolve()


def test_verification_catches_a_corrupted_file_and_keeps_live_weights(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.save_pretrained(tmp_path / "a")
    probe = torch.tensor([[1, 2, 3, 4]])
    assert verify_adapter(model, tmp_path / "a", probe)["max_logit_diff"] == 0.0
    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = weights[name] + 1.0
    save_file(weights, str(tmp_path / "a" / "adapter_model.safetensors"))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=probe).logits
    with pytest.raises(AdapterVerificationError, match="does not reproduce"):
        verify_adapter(model, tmp_path / "a", probe)
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, before)


def test_sharded_save_path_writes_a_checked_adapter(tiny_model_dir, tmp_path, monkeypatch):
    """ZeRO-3/FSDP save through Trainer.save_model (here on one process, the same code path)."""
    monkeypatch.setattr(LoraFinetune, "sharded", lambda self: True)
    manifest = train(cfg_for(tiny_model_dir, tmp_path))
    out = tmp_path / "out"
    assert manifest["verification"]["max_logit_diff"] is None and manifest["verification"]["tensors"] == 8
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob(".saving-*")) and not (out / "training_args.bin").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))


def test_bf16_training_keeps_fp32_adapter_and_verifies(tiny_model_dir, tmp_path):
    """bf16: frozen base stored in bf16, LoRA weights fp32, verification after training passes."""
    manifest = train(cfg_for(tiny_model_dir, tmp_path, precision="bf16"))
    assert manifest["precision"] == "bf16" and manifest["verification"]["max_logit_diff"] <= 1e-4
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_eval_after_training_writes_a_report(tiny_model_dir, tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text(
        "".join(json.dumps({"question": f"Add {i} and {i}.", "answer": f"#### {2 * i}"}) + "\n" for i in range(3))
    )
    manifest = train(cfg_for(tiny_model_dir, tmp_path, eval_data_path=str(held), eval_max_new_tokens=4))
    out = tmp_path / "out"
    assert (out / "eval" / "report.html").is_file()
    on_disk = json.loads((out / "manifest.json").read_text())
    assert set(on_disk["eval"]["scores"]) == {"base", "out"} == set(manifest["eval"]["scores"])
    with pytest.raises(Exception, match="file not found"):
        LoraFinetune(cfg_for(tiny_model_dir, tmp_path / "x", eval_data_path=str(tmp_path / "nope.json"))).check()
