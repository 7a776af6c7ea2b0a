"""MIA-DPO generation with attention on a tiny random LLaVA: formats, padding, layers, a hand check."""

from __future__ import annotations

import math
import random

import pytest
import torch

from augment.mia.formats import AugmentedSample, SourceSample, build_augmented
from augment.mia.generate import generate_with_attention, prompt_messages, vision_geometry
from augment.mia.tokens import augmented_token_groups

NEW_TOKENS = 8
GRID = {"num_tiles": 4, "tile_size": 32, "margin": 4, "square": True}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from datamodules.worlds.shapes import vocabulary
    from mmpo.tiny.llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("mia-gen") / "tiny-llava", vocabulary(), image_size=32)


@pytest.fixture(scope="module")
def model(tiny_path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_path, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def processor(tiny_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def samples() -> dict[str, AugmentedSample]:
    from datamodules.worlds.shapes import ShapesWorld

    world = ShapesWorld(seed=0)
    records = [world.record("train", i) for i in range(8)]
    pool = [(r["id"], world.image(r)) for r in records]
    sources = [SourceSample(r["id"], world.image(r), r["prompt"], r["chosen"]) for r in records]
    return {
        "seq2": build_augmented(sources[0], pool, "sequence", random.Random(0), num_images=2),
        "seq3": build_augmented(sources[1], pool, "sequence", random.Random(1), num_images=3),
        "grid": build_augmented(sources[2], pool, "grid", random.Random(2), **GRID),
        "pip": build_augmented(sources[3], pool, "pic_in_pic", random.Random(3)),
    }


def run(model, processor, batch, **kwargs):
    return generate_with_attention(model, processor, batch, max_new_tokens=NEW_TOKENS, progress=False, **kwargs)


def prompt_length(processor, sample: AugmentedSample) -> int:
    text = processor.apply_chat_template(prompt_messages(sample.prompt), add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=list(sample.images), return_tensors="pt")["input_ids"].shape[1]


def generate_alone(model, processor, sample: AugmentedSample):
    """Greedy generation of one sample with every attention map: (its prompt's token ids, generate's output)."""
    text = processor.apply_chat_template(prompt_messages(sample.prompt), add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=list(sample.images), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            output_attentions=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return enc["input_ids"][0], out


def assert_same(a, b, tol=1e-4):
    assert a.answer == b.answer and a.n_generated == b.n_generated
    assert a.ratio == pytest.approx(b.ratio, abs=tol)
    assert a.perplexity == pytest.approx(b.perplexity, abs=tol)


def test_prompt_messages_keep_image_order():
    messages = prompt_messages("Image1: <image>\nImage2: <image>\nIn Image2, what ?")
    content = messages[0]["content"]
    assert [c["type"] for c in content] == ["text", "image", "text", "image", "text"]
    assert content[-1]["text"] == "In Image2, what ?"


def test_vision_geometry_from_processor_and_config(model, processor):
    geometry = vision_geometry(model, processor)
    assert geometry.patch_grid == (4, 4) and geometry.tokens_per_image == 16 and geometry.input_size == 32
    assert geometry.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")


def test_every_format_in_one_batch_gets_its_own_results(model, processor, samples):
    batch = list(samples.values())
    side = processor.tokenizer.padding_side
    results = run(model, processor, batch, batch_size=4)
    assert processor.tokenizer.padding_side == side  # restored
    assert [r.sample for r in results] == batch
    # four prompts of different lengths and image counts, left-padded together: each result is the one the
    # sample gets alone (layer 2: the middle of the 4 decoder layers)
    for sample, result in zip(batch, results, strict=True):
        alone = run(model, processor, [sample], batch_size=1)[0]
        assert_same(alone, result)
        assert result.layer == alone.layer == 2


def test_left_padding_does_not_change_results(model, processor, samples):
    short, long = samples["pip"], samples["seq3"]
    assert prompt_length(processor, long) > prompt_length(processor, short)  # `short` gets left padding
    alone = run(model, processor, [short], batch_size=1)[0]
    padded = run(model, processor, [long, short, samples["grid"]], batch_size=3)
    assert_same(alone, padded[1])
    # batch_size splits the list into batches; results stay in order and match
    assert_same(padded[0], run(model, processor, [long], batch_size=1)[0])


def test_eos_masks_later_tokens_and_padding_rows(model, processor, samples):
    """A row that ends early in a batch that goes on: its later rows and log-probs must not count."""
    early, other, layer = samples["seq2"], samples["grid"], 2
    reference = model.generation_config.eos_token_id
    # pick as "EOS" the first token of `early`'s answer that is new, so its answer stops right after it
    prompt_ids, out = generate_alone(model, processor, early)
    prompt = len(prompt_ids)
    ids = out.sequences[0, prompt:]
    stop = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    try:
        model.generation_config.eos_token_id = int(ids[stop])
        alone = run(model, processor, [early], batch_size=1, layer=layer)[0]
        batch = run(model, processor, [other, early], batch_size=2, layer=layer)
    finally:
        model.generation_config.eos_token_id = reference
    assert alone.n_generated == stop + 1
    assert alone.answer == processor.tokenizer.decode(ids[:stop], skip_special_tokens=True).strip()
    assert batch[0].n_generated > alone.n_generated  # the batch really generated past `early`'s EOS
    assert_same(alone, batch[1])
    # by hand: the answer is the tokens up to and including the EOS, none after it, for both statistics
    answer = range(stop + 1)
    logps = [float(torch.log_softmax(out.logits[s][0].float(), -1)[ids[s]]) for s in answer]
    assert alone.perplexity == pytest.approx(math.exp(-sum(logps) / len(logps)), rel=1e-5)
    attn = torch.stack([out.attentions[s][layer][0, :, -1, :prompt] for s in answer]).mean(dim=(0, 1))  # (P,)
    geometry = vision_geometry(model, processor)
    groups = augmented_token_groups(
        early, prompt_ids, geometry.image_token_id, tokens_per_image=16, patch_grid=(4, 4), input_size=32
    )
    means = [float(attn[g].mean()) for g in groups]
    assert alone.ratio == pytest.approx(means[early.target_index] / sum(means), abs=1e-6)


def test_layer_choice(model, processor, samples):
    sample = samples["grid"]
    default = run(model, processor, [sample])[0]
    assert default.layer == 2 and run(model, processor, [sample], layer=-1)[0].layer == 3
    first = run(model, processor, [sample], layer=0)[0]
    assert first.layer == 0 and first.ratio != pytest.approx(default.ratio, abs=1e-6)
    assert first.answer == default.answer  # the layer read changes nothing about generation
    with pytest.raises(ValueError, match="out of range"):
        run(model, processor, [sample], layer=4)


@pytest.mark.parametrize("name", ["seq2", "seq3", "grid", "pip"])
def test_ratio_and_perplexity_match_a_hand_computation(model, processor, samples, name):
    sample, layer = samples[name], 2
    prompt_ids, out = generate_alone(model, processor, sample)
    prompt = len(prompt_ids)
    # the row that produced token s is the last query of step s; keep the prompt's keys only
    rows = torch.stack([step[layer][0, :, -1, :prompt] for step in out.attentions])  # (S, heads, P)
    attn = rows.mean(dim=(0, 1))  # (P,)
    geometry = vision_geometry(model, processor)
    groups = augmented_token_groups(
        sample,
        prompt_ids,
        geometry.image_token_id,
        tokens_per_image=16,
        patch_grid=(4, 4),
        input_size=32,
    )
    means = [float(attn[g].mean()) for g in groups]
    expected_ratio = means[sample.target_index] / sum(means)
    generated = out.sequences[0, prompt:]
    logps = [torch.log_softmax(step[0].float(), -1)[t] for step, t in zip(out.logits, generated, strict=True)]
    expected_ppl = math.exp(-sum(float(lp) for lp in logps) / len(logps))

    result = run(model, processor, [sample], layer=layer)[0]
    assert len(generated) == NEW_TOKENS == result.n_generated  # the random model emits no EOS here
    assert result.answer == processor.tokenizer.decode(generated, skip_special_tokens=True).strip()
    assert result.ratio == pytest.approx(expected_ratio, abs=1e-6)
    assert result.perplexity == pytest.approx(expected_ppl, rel=1e-5)


def test_sdpa_model_gives_a_clear_error(tiny_path, processor, samples):
    from transformers import AutoModelForImageTextToText

    sdpa = AutoModelForImageTextToText.from_pretrained(tiny_path, attn_implementation="sdpa").eval()
    side = processor.tokenizer.padding_side
    with pytest.raises(RuntimeError, match="eager"):
        run(sdpa, processor, [samples["pip"]])
    assert processor.tokenizer.padding_side == side
