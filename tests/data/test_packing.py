"""Packing (padding-free batches): packed examples must not see each other, and a packed batch
must train exactly like the padded batch of the same examples (same loss, same gradients)."""

from __future__ import annotations

import pytest
import torch

from lorakit.data.collate import build_collator, packing_supported, require_packing
from lorakit.errors import ConfigError

# The attentions packing is claimed for on CPU. flex_attention isolates too (same mask function),
# but on CPU torch 2.13's inductor fails to recompile it for a second sequence length, packed or
# not, so it is not usable for training here; packing_supported then refuses it.
IMPLS = ["sdpa", "eager"]


def _features(vocab: int) -> list[dict]:
    """Examples of different lengths, prompt labels masked; the last one is trained from its first
    token (train_on_inputs without BOS), the case where the example boundary matters."""
    g = torch.Generator().manual_seed(1)
    feats = []
    for n_prompt, n_answer in [(4, 5), (9, 3), (2, 8), (0, 6)]:
        ids = torch.randint(3, vocab, (n_prompt + n_answer,), generator=g).tolist()
        labels = [-100] * n_prompt + ids[n_prompt:]
        feats.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return feats


def _load(path, impl: str, use_cache: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32)
    model.config.use_cache = use_cache  # as the recipe sets it; True breaks isolation (test below)
    return model


@pytest.fixture(scope="module", params=IMPLS)
def model(request, tiny_model_dir):
    return _load(tiny_model_dir, request.param).eval()


@pytest.fixture(scope="module")
def feats(tiny_model_dir):
    import json

    return _features(json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"])


def _batches(tokenizer, feats):
    return build_collator(tokenizer, packing=True)(feats), build_collator(tokenizer, packing=False)(feats)


def test_flattened_batch_has_no_padding(tiny_tokenizer, feats):
    packed, padded = _batches(tiny_tokenizer, feats)
    lengths = [len(f["input_ids"]) for f in feats]
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert packed["input_ids"][0].tolist() == [t for f in feats for t in f["input_ids"]]
    assert packed["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert "attention_mask" not in packed  # a mask would switch the packed-sequence mask off
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"].numel() > sum(lengths)


def test_same_label_tokens_as_padded(tiny_tokenizer, feats):
    """The causal-LM loss targets labels[..., 1:]; both forms must target the same tokens in the
    same order, and Trainer's num_items_in_batch (labels[..., 1:] != -100) must agree."""
    packed, padded = _batches(tiny_tokenizer, feats)
    p = packed["labels"][0, 1:]
    targets_packed = p[p != -100].tolist()
    targets_padded = [t for row in padded["labels"][:, 1:].tolist() for t in row if t != -100]
    assert targets_packed == targets_padded
    expected = sum(sum(1 for x in f["labels"][1:] if x != -100) for f in feats)
    assert len(targets_packed) == expected
    # the first label of each example is never a target: it would be predicted from the previous example
    starts = torch.tensor([0] + [len(f["input_ids"]) for f in feats]).cumsum(0)[:-1]
    assert (packed["labels"][0, starts] == -100).all()


def test_packed_logits_equal_alone(model, tiny_tokenizer, feats):
    packed, _ = _batches(tiny_tokenizer, feats)
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for f in feats:
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            n = len(f["input_ids"])
            torch.testing.assert_close(out[start : start + n], alone, atol=1e-4, rtol=1e-4)
            start += n
    assert packing_supported(model) == (True, "")


def test_packed_loss_equals_padded(model, tiny_tokenizer, feats):
    packed, padded = _batches(tiny_tokenizer, feats)
    n_items = padded["labels"][:, 1:].ne(-100).sum()
    assert packed["labels"][:, 1:].ne(-100).sum() == n_items
    with torch.no_grad():
        loss_packed = model(**packed).loss
        loss_padded = model(**padded).loss
        # as the Trainer calls it (gradient accumulation): sum / num_items_in_batch
        trainer_packed = model(**packed, num_items_in_batch=n_items).loss
        trainer_padded = model(**padded, num_items_in_batch=n_items).loss
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-4, rtol=0)
    torch.testing.assert_close(trainer_packed, trainer_padded, atol=1e-4, rtol=0)
    torch.testing.assert_close(trainer_packed, loss_padded, atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_gradients_match(impl, tiny_model_dir, tiny_tokenizer, feats):
    from peft import LoraConfig, get_peft_model

    packed, padded = _batches(tiny_tokenizer, feats)
    torch.manual_seed(0)
    # init_lora_weights=False: B random too, so the A gradients are not all zero
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(_load(tiny_model_dir, impl), lora)
    peft_model.train()
    grads = []
    for batch in (packed, padded):
        peft_model.zero_grad()
        peft_model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for name, g in grads[0].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    assert packing_supported(peft_model) == (True, "")


def test_use_cache_mixes_examples_and_is_refused(tiny_model_dir, tiny_tokenizer, feats):
    """With config.use_cache=True (Llama's default) the model makes a KV cache, transformers then
    skips the packed-sequence mask and examples attend to each other: packing must be refused."""
    model = _load(tiny_model_dir, "sdpa", use_cache=True).eval()
    packed, _ = _batches(tiny_tokenizer, feats)
    second = slice(len(feats[0]["input_ids"]), len(feats[0]["input_ids"]) + len(feats[1]["input_ids"]))
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0, second]
        alone = model(input_ids=torch.tensor([feats[1]["input_ids"]])).logits[0]
    assert (out - alone).abs().max() > 1e-2  # mixed
    ok, why = packing_supported(model)
    assert not ok and "use_cache" in why
    with pytest.raises(ConfigError) as err:
        require_packing(model)
    msg = str(err.value)
    assert msg.startswith("packing: ") and msg.endswith("set packing: false") and "\n" not in msg
    model.config.use_cache = False
    require_packing(model)  # no error once the cache is off
