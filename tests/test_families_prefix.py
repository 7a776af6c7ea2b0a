"""Model coverage, second part: soft-capped heads and the families whose responses need more than the plain
shared prompt pass (PaliGemma's prefix token types, Mllama's cross-attention), against the naive forward.

The tiny builds and batches are shared with ``tests/test_families.py`` (``helpers.families``, session-scoped).
"""

import math

import pytest
import torch
from helpers.equivalence import (
    assert_same_logps_losses_and_gradients,
    comparison_module,
    training_comparison_module,
)
from helpers.families import backbone as _backbone
from helpers.families import with_fields as _with

from mmpo.backbones import VisionLanguageBackbone


def _soft_capped(module_or_model, cap):
    """Set the Gemma 2 language model's final logit soft-cap (30 in PaliGemma 2, where tiny logits never reach it)."""
    model = getattr(module_or_model, "policy", module_or_model)
    model.config.get_text_config().final_logit_softcapping = cap
    return module_or_model


def test_soft_capped_head_caps_logits_and_stays_finite():
    from mmpo.logprobs import head_logprobs, soft_capped

    head = torch.nn.Identity()
    assert soft_capped(head, None) is head
    logits = torch.tensor([[0.0, 2.0, -1e4, 1e4]])
    capped = soft_capped(head, 2.0)(logits)
    torch.testing.assert_close(capped, torch.tensor([[0.0, 2 * math.tanh(1.0), -2.0, 2.0]]))
    # log-softmax over the capped logits of target 3: 2 - log(1 + e^(2 tanh 1) + e^-2 + e^2)
    want = 2.0 - math.log(1 + math.exp(2 * math.tanh(1.0)) + math.exp(-2.0) + math.exp(2.0))
    got = head_logprobs(logits, soft_capped(head, 2.0), torch.tensor([3]))
    assert torch.isfinite(got).all() and abs(float(got) - want) < 1e-6
    with pytest.raises(ValueError, match="soft-cap"):
        soft_capped(head, 0.0)


@pytest.mark.parametrize("images", [1, 2])
def test_paligemma_shared_prompt_pass_gives_the_naive_logps_losses_and_gradients(tiny, batches, images):
    # The prompt (token type 0) attends bidirectionally in the prompt pass, the responses (type 1) causally
    # on its cache, positions from 1 as PaliGemma counts them; the head's soft-cap, set to 0.5 so that it acts,
    # is applied per chunk. A LoRA step's log-probs, losses and gradients equal the naive path's.
    path, batch = tiny("paligemma2"), batches("paligemma2", images)
    shared = _soft_capped(comparison_module(path, lora=True), 0.5)
    naive = _soft_capped(comparison_module(path, lora=True, shared_prefix=False), 0.5)
    assert VisionLanguageBackbone._naive_reason(shared.backbone.unwrap(shared.policy), batch) is None
    assert_same_logps_losses_and_gradients(shared, naive, batch)


def test_paligemma_soft_cap_and_prefix_types_reach_the_hidden_state_paths(tiny, batches):
    # Both hidden-state paths (the shared prompt pass and the naive rows) equal the model's own capped logits;
    # without the cap, or without the prompt's bidirectional token types, the numbers move.
    from mmpo.logprobs import response_logprobs

    batch = batches("paligemma2", 2)
    backbone = _backbone(tiny("paligemma2"))
    model = _soft_capped(backbone.build().eval(), 0.5)
    base = backbone.unwrap(model)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.row_media()}
    with torch.no_grad():
        reference = response_logprobs(base(**inputs, use_cache=False).logits, batch.input_ids, batch.response_mask)
        shared = backbone.token_logps(model, batch)
        backbone.shared_prefix = False
        naive = backbone.token_logps(model, batch)
        backbone.shared_prefix = True
        untyped = {key: v for key, v in batch.media.items() if key != "token_type_ids"}
        causal = backbone.token_logps(model, _with(batch, media=untyped))
        _soft_capped(model, None)
        uncapped = backbone.token_logps(model, batch)
    torch.testing.assert_close(shared, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(naive, reference, atol=1e-5, rtol=1e-5)
    assert (uncapped - shared)[batch.response_mask].abs().max() > 1e-2
    assert (causal - shared)[batch.response_mask].abs().max() > 1e-4


@pytest.mark.parametrize(
    ("images", "pack", "lora"), [(1, True, True), (1, False, True), (2, True, True), (2, False, False)]
)
def test_mllama_shared_prompt_pass_gives_the_naive_logps_losses_and_gradients(tiny, batches, images, pack, lora):
    # The prompt pass records the cross-attention layer's image keys and values with the self-attention ones;
    # the responses read them (repeated K times, or once with the K responses packed in a row) under their
    # rows of the cross-attention mask. Log-probs, losses and every gradient (the cross-attention layer's key
    # projection, reached through the cache; in full fine-tuning the vision tower's too) equal the naive path's.
    path, batch = tiny("mllama"), batches("mllama", images)
    shared = comparison_module(path, lora=lora, pack_responses=pack, freeze_vision_tower=False)
    naive = comparison_module(path, lora=lora, shared_prefix=False, freeze_vision_tower=False)
    assert VisionLanguageBackbone._naive_reason(shared.backbone.unwrap(shared.policy), batch) is None
    grads = assert_same_logps_losses_and_gradients(shared, naive, batch)
    assert any("cross_attn.k_proj" in n for n in grads)
    assert any("vision_model" in n for n in grads) == (not lora)


@pytest.mark.parametrize("family", ["mllama", "paligemma2"])
def test_cross_attention_and_prefix_types_under_checkpointing_give_the_naive_gradients(tiny, batches, family):
    # checkpointed layers run again in the backward pass: Mllama's cross-attention layer reads the recorded image
    # states on both runs, PaliGemma's prompt layers rerun with their bidirectional mask
    path, batch = tiny(family), batches(family, 2)
    shared = training_comparison_module(path, lora=True, gradient_checkpointing=True)
    naive = training_comparison_module(path, lora=True, shared_prefix=False)
    layers = shared.backbone.unwrap(shared.policy).model.language_model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert VisionLanguageBackbone._naive_reason(shared.backbone.unwrap(shared.policy), batch) is None
    assert_same_logps_losses_and_gradients(shared, naive, batch)


def test_mllama_vision_tower_runs_once_per_group_and_a_skipped_cross_layer_is_refused(tiny, batches, monkeypatch):
    from transformers.models.mllama import modeling_mllama

    batch = batches("mllama", 2)
    backbone = _backbone(tiny("mllama"))
    model = backbone.build().eval()
    rows = []
    tower = backbone.unwrap(model).model.vision_model
    hook = tower.register_forward_hook(lambda m, a, kw, out: rows.append(kw["pixel_values"].shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            backbone.token_logps(model, batch)
            backbone.shared_prefix = False
            backbone.token_logps(model, batch)
            backbone.shared_prefix = True
    finally:
        hook.remove()
    assert rows == [batch.num_groups, batch.num_groups * batch.group_size]
    # a response pass whose cross-attention layer finds no image states skips it and would see no image:
    # refused instead of giving log-probs without the images
    monkeypatch.setattr(modeling_mllama, "_has_cached_cross_attention_states", lambda cache, idx: False)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"layers \[1\] did not read"):
        backbone.token_logps(model, batch)
