"""The shared prompt pass under activation (gradient) checkpointing.

Checkpointed decoder layers run again in the backward pass on the arguments they were given, the
key/value cache included; the shared prefix's cache gives such a rerun what the first run saw. These
tests compare the checkpointed shared-prefix step with the naive one (log-probs, losses, every
gradient), count the passes, and measure the step's peak tensor memory.
"""

import contextlib
import weakref
from collections import Counter

import pytest
import torch
from helpers.data import write_mixed
from helpers.equivalence import assert_same_logps_losses_and_gradients, training_comparison_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from datamodules import PreferenceDataset, VisionPreferenceCollator, load_preference_records
from mmpo.backbones import VisionLanguageBackbone
from mmpo.backbones import shared_prefix as sp
from mmpo.losses import PlackettLuceLoss

EXTRA = ["a red circle .", "there is a blue square and a green star ."]


@pytest.fixture(scope="module")
def mixed_samples(world, tmp_path_factory):
    # single-image, two-image and text-only prompts of different lengths
    path = write_mixed(world, tmp_path_factory.mktemp("ckpt") / "mixed.jsonl")
    records, _ = load_preference_records(path, data_root=world)
    ds = PreferenceDataset(records)
    return [ds[i] for i in range(len(ds))]


def group_batch(processor, samples, k):
    """Groups of ``k`` responses: chosen, rejected, then extra answers of different lengths."""
    items = []
    for i, s in enumerate(samples):
        responses = [s["record"].chosen, s["record"].rejected, *EXTRA[i % 2 :]][:k]
        items.append({**s, "responses": responses})
    return VisionPreferenceCollator(processor)(items)


def decoder_layers(module):
    return module.backbone.unwrap(module.policy).model.language_model.layers


@pytest.mark.parametrize("naive_checkpointing", [True, False])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_checkpointed_shared_prefix_equals_naive(
    tiny_llava, processor, mixed_samples, k, pack, lora, naive_checkpointing
):
    batch = group_batch(processor, mixed_samples, k)
    common = {"loss": PlackettLuceLoss(beta=0.1), "freeze_vision_tower": False}
    shared = training_comparison_module(
        tiny_llava, lora, **common, shared_prefix=True, pack_responses=pack, gradient_checkpointing=True
    )
    naive = training_comparison_module(
        tiny_llava, lora, **common, shared_prefix=False, gradient_checkpointing=naive_checkpointing
    )
    assert all(layer.gradient_checkpointing and layer.training for layer in decoder_layers(shared))
    assert shared.backbone._naive_reason(shared.backbone.unwrap(shared.policy), batch) is None
    grads = assert_same_logps_losses_and_gradients(shared, naive, batch)
    assert not shared.backbone._fallback_noted  # the shared prefix ran, no fallback notice
    if not lora:  # gradients reach the prompt's vision tower through the cache
        assert any(g.abs().sum() > 0 for n, g in grads.items() if "vision_tower" in n)


def test_backbone_keeps_the_shared_prefix_under_its_checkpointing(tiny_llava, mixed_samples, processor):
    batch = group_batch(processor, mixed_samples, 2)
    bb = VisionLanguageBackbone(str(tiny_llava), gradient_checkpointing=True)  # as the 7B configs set it
    model = bb.build().train()
    base = bb.unwrap(model)
    assert all(layer.gradient_checkpointing for layer in base.model.language_model.layers)
    assert bb._naive_reason(base, batch) is None
    logps = bb.token_logps(model, batch)
    assert not bb._fallback_noted
    assert torch.isfinite(logps).all() and logps[batch.response_mask].lt(0).all()
    # the layers let the cache through only during the two passes: naive passes and generation are untouched
    assert not [m for m in base.modules() if "_can_checkpoint_with_cache" in m.__dict__]


def test_reentrant_checkpointing_and_layers_without_the_cache_switch_fall_back(
    tiny_llava, mixed_samples, processor, monkeypatch
):
    from transformers.modeling_layers import GradientCheckpointingLayer

    batch = group_batch(processor, mixed_samples, 2)
    bb = VisionLanguageBackbone(str(tiny_llava))
    base = bb.unwrap(bb.build().train())
    assert bb._naive_reason(base, batch) is None  # the flagged modules are found here, once
    # switched on after the first step: reentrant checkpointing computes the prompt's cache without gradients
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert "reentrant" in bb._naive_reason(base, batch)
    with torch.no_grad():  # nothing is checkpointed without gradients (e.g. the adapter-disabled reference)
        assert bb._naive_reason(base, batch) is None
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert bb._naive_reason(base, batch) is None
    monkeypatch.delattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")  # an older transformers
    assert "drops the key/value cache" in bb._naive_reason(base, batch)


def test_layers_that_drop_the_cache_raise_instead_of_giving_wrong_log_probs(
    tiny_llava, mixed_samples, processor, monkeypatch
):
    batch = group_batch(processor, mixed_samples, 2)
    module = training_comparison_module(tiny_llava, lora=True, gradient_checkpointing=True)
    base = module.backbone.unwrap(module.policy)
    # without the switch, transformers' checkpointed layers set cache=None
    monkeypatch.setattr(sp, "_cache_kept_under_checkpointing", lambda inner: contextlib.nullcontext())
    with pytest.raises(RuntimeError, match="dropped the key/value cache"):
        sp.shared_prefix_token_logps(base, batch, pad_id=0)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_each_pass_runs_once_and_a_checkpointed_layer_at_most_twice(
    tiny_llava, mixed_samples, processor, checkpointing
):
    # One training step (policy forward and backward, reference forward) with LoRA and a frozen tower.
    batch = group_batch(processor, mixed_samples, 2)
    module = training_comparison_module(
        tiny_llava, lora=True, gradient_checkpointing=checkpointing, pack_responses=False
    )
    assert module._share_media  # frozen, adapter-free tower: policy and reference share its features
    inner = module.backbone.unwrap(module.policy).model
    tower_calls, tower_layer_calls, layer_shapes = [], [], []
    # pre-hooks on each layer's first module: inside the checkpointed function, so its reruns in the backward
    # pass count too (a rerun stops once it has recomputed what the backward needs, so later modules may not run)
    hooks = [
        inner.vision_tower.register_forward_hook(lambda *a: tower_calls.append(1)),
        inner.vision_tower.encoder.layers[0].layer_norm1.register_forward_pre_hook(
            lambda *a: tower_layer_calls.append(1)
        ),
        inner.language_model.layers[0].input_layernorm.register_forward_pre_hook(
            lambda m, i: layer_shapes.append(i[0].shape[:2])
        ),
    ]
    out, _, _ = module.compute(batch)
    out.losses.mean().backward()
    for h in hooks:
        h.remove()
    prompts, responses = batch.host_lengths()
    b, n = batch.num_groups, batch.input_ids.shape[0]
    prompt_shape, response_shape = (b, max(prompts[:b])), (n, max(responses))
    runs = 1 + checkpointing  # the policy's forward, and its rerun in the backward pass when checkpointed
    assert Counter(layer_shapes) == {prompt_shape: runs + 1, response_shape: runs + 1}  # + the reference
    assert len(tower_calls) == 1  # the frozen tower: once per step, for the policy and the reference
    # transformers' enable_input_require_grads also hooks the tower's patch embedding, so its checkpointed
    # layers rerun in the backward pass too: still at most twice
    assert len(tower_layer_calls) <= runs


class PeakTensorBytes(TorchDispatchMode):
    """The peak of the bytes held by the tensors that operators create inside the block.

    Parameters and inputs made before the block are not counted; activations, their reruns,
    gradients and temporaries are. A storage is counted from the operator that makes it until it is
    freed (CPU tensors have no allocator statistics to read).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    self._seen[storage] = nbytes = storage.nbytes()
                    self.live += nbytes
                    weakref.finalize(storage, self._freed, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def test_checkpointing_lowers_the_peak_memory_of_a_shared_prefix_step(tiny_llava, mixed_samples, processor):
    batch = group_batch(processor, mixed_samples, 2)

    def peak(shared: bool, checkpointing: bool) -> int:
        module = training_comparison_module(
            tiny_llava, lora=True, shared_prefix=shared, gradient_checkpointing=checkpointing
        )
        with PeakTensorBytes() as tracker:
            stats = module.backbone.statistics(module.policy, batch)
            stats.logps.sum().backward()
        return tracker.peak

    shared_checkpointed, shared_plain = peak(True, True), peak(True, False)
    naive_checkpointed = peak(False, True)  # what checkpointing ran before: the naive path
    assert shared_checkpointed < 0.7 * shared_plain
    assert shared_checkpointed < naive_checkpointed


def test_prompt_cache_reads_as_a_dynamic_cache_would_and_replays_unchanged():
    # full and sliding-window layers; the prompt (6 tokens) is longer than the window (4)
    from transformers import Qwen2Config
    from transformers.cache_utils import DynamicCache

    config = Qwen2Config(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
    )  # fmt: skip
    assert config.layer_types == ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    prompt_kv = [(torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)) for _ in range(2)]  # (B, heads, Tp, d)
    new_kv = [(torch.randn(6, 2, 3, 8), torch.randn(6, 2, 3, 8)) for _ in range(2)]  # K = 3 responses per group

    reference = DynamicCache(config=config)
    cache = sp._PromptCache(config)
    for i, (key, value) in enumerate(prompt_kv):
        reference.update(key, value, i)
        cache.update(key, value, i)
        replay = cache.update(key + 1, value + 1, i)  # a checkpointed layer's rerun: nothing is written
        assert torch.equal(replay[0], key + 1) and torch.equal(replay[1], value + 1)
    reference.batch_repeat_interleave(3)
    reader = cache.reader(3)
    for i, (key, value) in enumerate(new_kv):
        sizes = reference.get_mask_sizes(3, i)
        assert reader.get_mask_sizes(3, i) == sizes and reader.get_seq_length(i) == reference.get_seq_length(i)
        want = reference.update(key, value, i)
        for _ in range(2):  # the forward, then the rerun: the same states both times
            got = reader.update(key, value, i)
            assert got[0].shape[-2] == sizes[0]
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert reader.read == cache.written == {0, 1}
