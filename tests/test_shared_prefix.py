"""The shared-prefix forward gives the naive path's log-probs, losses and gradients."""

import pytest
import torch
from helpers.data import write_mixed
from helpers.equivalence import assert_same_logps_losses_and_gradients, comparison_module

from datamodules import PreferenceDataset, VisionPreferenceCollator, load_preference_records
from mmpo.backbones import VisionLanguageBackbone


@pytest.fixture(scope="module")
def mixed_batch(world, processor, tmp_path_factory):
    # single-image, two-image and text-only prompts of different lengths in one batch
    path = write_mixed(world, tmp_path_factory.mktemp("mixed") / "mixed.jsonl")
    records, _ = load_preference_records(path, data_root=world)
    ds = PreferenceDataset(records)
    return VisionPreferenceCollator(processor)([ds[i] for i in range(len(ds))])


def _pair(tiny_llava, lora):
    return tuple(
        comparison_module(tiny_llava, lora, freeze_vision_tower=False, shared_prefix=shared) for shared in (True, False)
    )


def test_batch_mixes_prompt_lengths_and_image_counts(mixed_batch, processor):
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    counts = (mixed_batch.input_ids[:4] == image_id).sum(-1).tolist()
    assert counts == [36, 72, 36, 0]
    assert len(set(mixed_batch.prompt_lengths[:4].tolist())) >= 3


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prefix_equals_naive_logps_losses_and_gradients(tiny_llava, mixed_batch, lora):
    shared, naive = _pair(tiny_llava, lora)
    grads = assert_same_logps_losses_and_gradients(shared, naive, mixed_batch)
    if not lora:  # gradients flow through the cache into the prompt's vision tower
        tower = [g for n, g in grads.items() if "vision_tower" in n]
        assert tower and any(g.abs().sum() > 0 for g in tower)


def test_pairs_with_different_media_take_the_naive_path(tiny_llava, mixed_batch):
    shared, naive = _pair(tiny_llava, lora=False)
    # the same pairs declared as having their own rejected media (media stored per row)
    different = type(mixed_batch)(**{**mixed_batch.__dict__, "shared_prompt": False, "media": mixed_batch.row_media()})
    assert "different media" in shared.backbone._naive_reason(shared.backbone.unwrap(shared.policy), different)
    a = shared.backbone.token_logps(shared.policy, different)
    b = naive.backbone.token_logps(naive.policy, mixed_batch)
    torch.testing.assert_close(a, b)


def test_policy_and_reference_share_one_vision_pass_with_identical_results(tiny_llava, mixed_batch):
    module, _ = _pair(tiny_llava, lora=True)
    # freeze the tower again (the helper unfroze it) so the media encoders are adapter-free and frozen
    for n, p in module.policy.named_parameters():
        if "vision_tower" in n or "multi_modal_projector" in n:
            p.requires_grad_(False)
    from mmpo.backbones.media_reuse import media_features_shareable

    assert media_features_shareable(module.policy)
    calls = []
    tower = module.backbone.unwrap(module.policy).model.vision_tower
    handle = tower.register_forward_hook(lambda *a: calls.append(1))
    module._share_media = True
    shared_out, _, shared_ref = module.compute(mixed_batch)
    assert len(calls) == 1  # one vision pass for policy and reference together
    module._share_media = False
    out, _, ref = module.compute(mixed_batch)
    assert len(calls) == 3
    handle.remove()
    torch.testing.assert_close(shared_ref.chosen, ref.chosen)
    torch.testing.assert_close(shared_out.losses, out.losses)


def test_media_features_are_not_shared_when_the_tower_trains(tiny_llava):
    from mmpo.backbones.media_reuse import media_features_shareable

    module, _ = _pair(tiny_llava, lora=False)  # full fine-tuning with the tower unfrozen
    assert not media_features_shareable(module.policy)


def test_checkpointing_switched_on_after_the_first_step_is_seen(tiny_llava, mixed_batch):
    bb = VisionLanguageBackbone(str(tiny_llava))
    model = bb.build().train()
    base = bb.unwrap(model)
    assert bb._naive_reason(base, mixed_batch) is None  # the flagged modules are found here, once
    # non-reentrant checkpointing keeps the shared prefix (test_shared_prefix_checkpointing.py); the
    # reentrant kind runs layers without gradients, so it falls back, and the switch is seen
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert "reentrant" in bb._naive_reason(base, mixed_batch)
    base.gradient_checkpointing_disable()
    assert bb._naive_reason(base, mixed_batch) is None


def test_shared_prefix_passes_the_cache_under_the_models_own_keyword(tiny_llava, mixed_batch):
    # transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns on the old name at every call
    import warnings

    shared, _ = _pair(tiny_llava, lora=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            shared.compute(mixed_batch)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_responses_equal_responses_on_the_repeated_cache(tiny_llava, mixed_batch, attention):
    # Both responses of a pair in one row under a block mask, on the unrepeated cache.
    from mmpo.backbones import shared_prefix as sp

    shared, _ = _pair(tiny_llava, lora=True)
    base = shared.backbone.unwrap(shared.policy)
    base.model.config.text_config._attn_implementation = attention
    base.model.language_model.config._attn_implementation = attention
    assert sp._attention_kind(base.model) == attention

    def run(pack):
        shared.policy.zero_grad()
        out = sp.shared_prefix_token_logps(base, mixed_batch, pad_id=0, pack_responses=pack)
        out.sum().backward()
        grads = {n: p.grad.clone() for n, p in shared.policy.named_parameters() if p.grad is not None}
        return out.detach(), grads

    packed, g_packed = run(True)
    repeated, g_repeated = run(False)
    mask = mixed_batch.response_mask
    assert (packed[~mask] == 0).all() and (packed[mask] < 0).all()
    torch.testing.assert_close(packed, repeated, atol=2e-5, rtol=1e-5)
    assert g_packed.keys() == g_repeated.keys() and len(g_packed) > 0
    for n, g in g_packed.items():
        torch.testing.assert_close(g, g_repeated[n], atol=1e-5, rtol=1e-4, msg=n)


def test_packed_responses_refused_without_a_custom_mask_attention(tiny_llava, mixed_batch, monkeypatch):
    from mmpo.backbones import shared_prefix as sp

    shared, _ = _pair(tiny_llava, lora=False)
    base = shared.backbone.unwrap(shared.policy)
    monkeypatch.setattr(sp, "_attention_kind", lambda inner: None)  # e.g. flash_attention_2
    with torch.no_grad():
        with pytest.raises(ValueError, match="sdpa or eager"):
            sp.shared_prefix_token_logps(base, mixed_batch, pad_id=0, pack_responses=True)
        auto = sp.shared_prefix_token_logps(base, mixed_batch, pad_id=0)  # falls back to the repeated cache
        monkeypatch.undo()
        torch.testing.assert_close(
            auto, sp.shared_prefix_token_logps(base, mixed_batch, pad_id=0), atol=2e-5, rtol=1e-5
        )


def test_responses_are_packed_by_default_only_behind_long_prompts(tiny_llava, mixed_batch, monkeypatch):
    from mmpo.backbones import shared_prefix as sp

    shared, _ = _pair(tiny_llava, lora=False)
    base = shared.backbone.unwrap(shared.policy)
    taken = []
    real = sp._packed_responses
    monkeypatch.setattr(sp, "_packed_responses", lambda *a: taken.append(True) or real(*a))
    width, longest = int(mixed_batch.prompt_lengths.max()), int(mixed_batch.response_mask.sum(-1).max())
    with torch.no_grad():
        monkeypatch.setattr(sp, "PACK_MIN_PROMPT_RATIO", width / longest + 0.1)
        sp.shared_prefix_token_logps(base, mixed_batch, pad_id=0)
        assert taken == []
        monkeypatch.setattr(sp, "PACK_MIN_PROMPT_RATIO", width / longest)
        sp.shared_prefix_token_logps(base, mixed_batch, pad_id=0)
        assert taken == [True]


def test_models_with_sliding_window_layers_are_not_packed():
    from types import SimpleNamespace as NS

    from mmpo.backbones import shared_prefix as sp

    def inner(**text):
        return NS(config=NS(text_config=NS(_attn_implementation="sdpa", **text)))

    assert sp._attention_kind(inner()) == "sdpa"  # Llama: no window
    assert sp._attention_kind(inner(layer_types=["full_attention"] * 4)) == "sdpa"
    assert sp._attention_kind(inner(layer_types=["full_attention", "sliding_attention"])) is None
    assert sp._attention_kind(inner(sliding_window=4096)) is None  # Mistral-style, no layer types
    assert sp._attention_kind(inner(sliding_window=4096, use_sliding_window=False)) == "sdpa"
    assert sp._attention_kind(inner(sliding_window=None)) == "sdpa"
