"""The GPU benchmark's architecture (LLaVA with a Qwen2 language model), at CPU-test sizes.

The `small` preset runs only on a GPU; this builds the same family with the same code path
(``benchmarks/presets.py``: tied embeddings, features from the tower's second-to-last layer, grouped
key/value heads, a model vocabulary wider than the tokenizer's) and checks that the shared-prefix
forward in both layouts gives the naive path's log-probs and gradients on it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from helpers.equivalence import assert_same_logps_losses_and_gradients, comparison_module

from datamodules import PreferenceDataset, VisionPreferenceCollator, load_preference_records
from mmpo.backbones import shared_prefix as sp

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _presets():
    sys.path.insert(0, str(BENCH))
    try:
        import presets
    finally:
        sys.path.remove(str(BENCH))
    return presets


@pytest.fixture(scope="module")
def qwen2_llava(tmp_path_factory):
    presets = _presets()
    PRESETS, build_model, write_data = presets.PRESETS, presets.build_model, presets.write_data
    small = PRESETS["small"]
    preset = dataclasses.replace(
        small,
        name="small-cpu-test",
        device="cpu",
        dtype="float32",
        image_size=32,
        patch_size=8,
        vision_width=32,
        vision_layers=2,
        vision_heads=2,
        vision_ff=64,
        text_width=64,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_ff=128,
        vocab_words=200,
        model_vocab=320,
    )
    root = tmp_path_factory.mktemp("qwen2")
    model_dir = build_model(preset, root)
    data = write_data(preset, images=2, n_pairs=2, root=root)
    records, _ = load_preference_records(data, data_root=data.parent)
    ds = PreferenceDataset(records)
    from transformers import AutoProcessor

    collator = VisionPreferenceCollator(AutoProcessor.from_pretrained(str(model_dir)))
    return model_dir, collator([ds[i] for i in range(len(ds))])


def _module(model_dir: Path, shared: bool, pack: bool | None = None):
    return comparison_module(model_dir, lora=True, shared_prefix=shared, pack_responses=pack)


def test_the_benchmark_model_is_a_qwen2_llava_with_the_presets_traits(qwen2_llava):
    model_dir, batch = qwen2_llava
    module = _module(model_dir, shared=True)
    inner = module.backbone.unwrap(module.policy)
    text = inner.config.text_config
    assert text.model_type == "qwen2" and text.vocab_size == 320 and text.num_key_value_heads == 2
    assert inner.config.vision_feature_layer == -2 and inner.config.tie_word_embeddings
    assert sp._attention_kind(inner.model) == "sdpa"  # full attention in every layer: packing allowed
    assert module.backbone._naive_reason(inner, batch) is None  # the shared prefix is taken, not the fallback
    # the preset's data: every response RESPONSE_TOKENS tokens long, every prompt as long, no padding
    assert batch.num_pairs == 2 and batch.response_mask.sum(-1).tolist() == [_presets().RESPONSE_TOKENS] * 4
    assert bool(batch.attention_mask.all()) and len(set(batch.prompt_lengths.tolist())) == 1


@pytest.mark.parametrize("pack", [True, False])
def test_shared_prefix_equals_naive_on_the_benchmark_architecture(qwen2_llava, pack):
    model_dir, batch = qwen2_llava
    shared, naive = _module(model_dir, shared=True, pack=pack), _module(model_dir, shared=False)
    assert_same_logps_losses_and_gradients(shared, naive, batch)
