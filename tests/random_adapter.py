"""A test helper: a LoRA adapter with random weights (tests/ is on sys.path via its conftest)."""

from pathlib import Path


def make_random_adapter(
    model_dir: Path, folder: Path, seed: int = 1, r: int = 4, alpha: int = 8, std: float = 0.5
) -> Path:
    """A LoRA adapter (q_proj, v_proj) saved by plain peft, with random non-zero B so it
    changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    model.save_pretrained(folder)
    return folder
