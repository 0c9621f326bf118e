"""lorakit's label-position loss is the standard causal-LM loss, computed with fewer logits."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainingArguments

from lorakit.data.records import Example, Turn
from lorakit.data.templates import load_template
from lorakit.data.tokenize import ExampleTokenizer
from lorakit.train.trainer import LorakitTrainer


def test_label_position_loss_equals_full_logits_loss(tiny_model_dir, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM"
        ),
    )
    enc = ExampleTokenizer(tiny_tokenizer, load_template("alpaca"), cutoff_len=512)
    feats = [
        enc(Example(turns=[Turn("user", q), Turn("assistant", a)]))
        for q, a in [
            ("Who are you?", "I am a helpful assistant."),
            ("What is 1 plus 1? Explain.", "2"),
            ("The quick brown fox", "jumps over the lazy dog. " * 3),
        ]
    ]
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")(feats)
    trainer = LorakitTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    model.train()
    ours = trainer.compute_loss(model, dict(batch))
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference = model(**batch).loss  # full logits, transformers' own loss
    reference.backward()
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-4), n
    # with a global token count (gradient accumulation), the sum is divided by it
    n_items = torch.tensor(100)
    scaled = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    n_trained = int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(scaled, reference * n_trained / 100, atol=1e-5)
