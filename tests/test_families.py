"""Model coverage: every family transformers' image-text-to-text class covers, built tiny and trained.

Each family of ``mmpo.tiny.families`` is written offline with its real model and processor classes and
loaded back through the auto classes; LoRA DPO then trains it for 2 steps through a Lightning
``Trainer`` with the disabled adapter as reference, on prompts with 1 and 2 images. docs/models.md is
the table of what these tests cover.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers.callbacks import LossesInMemory
from helpers.equivalence import (
    assert_same_logps_losses_and_gradients,
    comparison_module,
)
from helpers.families import backbone as _backbone
from helpers.families import datamodule as _datamodule
from helpers.families import with_fields as _with
from helpers.trainers import quiet_trainer

import mmpo.backbones.vlm as vlm
from datamodules import ImagePreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule
from mmpo.tiny.families import TINY_FAMILIES

# family -> (model class, processor class)
CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor"),
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
    "smolvlm": ("SmolVLMForConditionalGeneration", "SmolVLMProcessor"),
    "paligemma2": ("PaliGemmaForConditionalGeneration", "PaliGemmaProcessor"),
    "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Processor"),
    "mllama": ("MllamaForConditionalGeneration", "MllamaProcessor"),
    "mistral3": ("Mistral3ForConditionalGeneration", "PixtralProcessor"),
    "pixtral": ("LlavaForConditionalGeneration", "PixtralProcessor"),
    "internvl": ("InternVLForConditionalGeneration", "InternVLProcessor"),
}
# What the family's chat template writes around a one-image prompt, and the image token it expands to.
TEMPLATE_MARKERS = {
    "qwen2_vl": (["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>"], "<|image_pad|>"),
    "qwen2_5_vl": (["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>"], "<|image_pad|>"),
    "llava_onevision": (["<|im_start|>", "<|im_end|>"], "<image>"),
    "idefics3": (["<|begin_of_text|>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"], "<image>"),
    "smolvlm": (["<|im_start|>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"], "<image>"),
    "paligemma2": (["<bos>"], "<image>"),
    "gemma3": (
        ["<bos>", "<start_of_turn>", "<start_of_image>", "<end_of_image>", "<end_of_turn>"],
        "<image_soft_token>",
    ),
    "mllama": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|image|>"),
    "mistral3": (["<s>", "[INST]", "[IMG_BREAK]", "[IMG_END]", "[/INST]"], "[IMG]"),
    "pixtral": (["<s>", "[INST]", "[IMG_BREAK]", "[IMG_END]", "[/INST]"], "[IMG]"),
    "internvl": (["<|im_start|>", "<img>", "</img>", "<|im_end|>"], "<IMG_CONTEXT>"),
}
IMAGE_TOKENS = {  # per 32-pixel image
    "qwen2_vl": 16,
    "qwen2_5_vl": 16,
    "llava_onevision": 36,
    "idefics3": 4,
    "smolvlm": 4,
    "paligemma2": 16,
    "gemma3": 4,
    "mllama": 1,
    "mistral3": 4,
    "pixtral": 16,
    "internvl": 4,
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION = ("vision_tower", "visual", "vision_model", "multi_modal_projector", "connector")
LN2 = math.log(2)


def _adapted(model) -> list[str]:
    return [n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")]


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_build_loads_with_the_auto_classes_and_the_familys_template(tiny, family):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert (type(model).__name__, type(processor).__name__) == CLASSES[family]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[Image.new("RGB", (64, 64), (200, 40, 40))], return_tensors="pt")
    tokens = processor.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    markers, image_token = TEMPLATE_MARKERS[family]
    assert all(m in tokens for m in markers), (markers, tokens)
    assert tokens.count(image_token) == IMAGE_TOKENS[family]
    assert processor.tokenizer.unk_token not in tokens and "circle" in tokens  # every word is known


@pytest.mark.slow
@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_lora_dpo_trains_two_steps(tiny, pair_files, world, family, images, monkeypatch):
    notices = []
    monkeypatch.setattr(vlm, "rank_zero_info", notices.append)
    path = tiny(family)
    module = PreferenceModule(
        _backbone(path), DPOLoss(beta=0.1), reference="adapter", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)
    )
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    record = LossesInMemory()
    quiet_trainer(max_steps=2, callbacks=[record]).fit(module, datamodule=_datamodule(path, pair_files[images], world))

    assert len(record.losses) == 2 and all(math.isfinite(x) for x in record.losses)
    assert record.losses[0] == pytest.approx(LN2, abs=1e-5)  # a fresh adapter is its own reference
    after = dict(module.policy.named_parameters())
    assert before and all("lora_" in n for n in before)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)  # every adapter moved

    # the default targets: every projection of the language model (self- and cross-attention, MLP), nothing else
    adapted = _adapted(module.policy)
    layers = module.policy.config.get_text_config().num_hidden_layers
    assert len(adapted) == layers * len(PROJECTIONS)
    assert all(n.rsplit(".", 1)[1] in PROJECTIONS and not any(v in n for v in VISION) for n in adapted)

    assert not [m for m in notices if "shared-prefix forward off" in m]  # every family takes the shared pass


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_shared_prompt_pass_equals_the_naive_forward(tiny, batches, family):
    path = tiny(family)
    backbone = _backbone(path)
    model = backbone.build().eval()
    for images in (1, 2):
        batch = batches(family, images)
        with torch.no_grad():
            shared = backbone.token_logps(model, batch)
            backbone.shared_prefix = False
            naive = backbone.token_logps(model, batch)
            backbone.shared_prefix = True
        torch.testing.assert_close(shared, naive, atol=1e-5, rtol=1e-5)
        assert shared[batch.response_mask].lt(0).all()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "gemma3"])
def test_positions_and_token_types_carried_to_the_responses_give_the_naive_gradients(tiny, batches, family):
    # Qwen: the prompt's 3-axis positions come from the model's get_rope_index and the responses continue from
    # the largest position + 1. Gemma 3: the token types (an image's tokens attend to each other) are cut to the
    # prompt; the responses are text. A LoRA step's losses and gradients equal the naive path's (2 images)
    path, batch = tiny(family), batches(family, 2)
    shared = comparison_module(path, lora=True)
    naive = comparison_module(path, lora=True, shared_prefix=False)
    assert_same_logps_losses_and_gradients(shared, naive, batch)


# configs/families/: each family's smallest real checkpoint, given over the complete LLaVA-1.5 recipe
FAMILY_CONFIGS = {
    "qwen2_5_vl_3b": "qwen2_5_vl",
    "llava_onevision_0_5b": "llava_onevision",
    "idefics3_8b": "idefics3",
    "smolvlm_256m": "smolvlm",
    "paligemma2_3b": "paligemma2",
    "gemma3_4b": "gemma3",
    "llama32_11b_vision": "mllama",
    "mistral3_24b": "mistral3",
    "pixtral_12b": "pixtral",
    "internvl3_1b": "internvl",
}


@pytest.mark.parametrize(("config", "family"), FAMILY_CONFIGS.items())
def test_family_config_over_the_llava_recipe_builds_the_family_with_its_default_lora(tiny, monkeypatch, config, family):
    # loading stubbed with the family's tiny build: the config as written otherwise, and the default LoRA
    # targets fit the family (every projection of its language model, nothing of its vision tower)
    import yaml

    from mmpo.cli import MMPOCLI

    repo = Path(__file__).resolve().parents[1]
    path = tiny(family)
    load = vlm.VisionLanguageBackbone.load_pretrained
    monkeypatch.setattr(vlm.VisionLanguageBackbone, "load_pretrained", lambda self: load(_backbone(path)))
    partial = repo / "configs" / "families" / f"{config}.yaml"
    spec = yaml.safe_load(partial.read_text())
    args = ["--config", str(repo / "configs/llava15_7b_dpo_lora.yaml"), "--config", str(partial)]
    cli = MMPOCLI(args=[*args, "--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)
    hub = spec["model"]["init_args"]["backbone"]["init_args"]["model_name_or_path"]
    assert cli.model.backbone.model_name_or_path == hub and cli.datamodule.processor_name == hub
    assert cli.model.save_dir == spec["model"]["init_args"]["save_dir"]
    assert cli.datamodule.processor_kwargs == (spec.get("data", {}).get("init_args", {}).get("processor_kwargs") or {})
    assert f"--config configs/families/{config}.yaml" in partial.read_text()  # its header command names it
    cli.model.configure_model()
    adapted = _adapted(cli.model.policy)
    layers = cli.model.policy.config.get_text_config().num_hidden_layers
    assert len(adapted) == layers * len(PROJECTIONS)
    assert not any(v in n for n in adapted for v in VISION)


def _future_leak(backbone, model, batch) -> float:
    """How much changing each row's last response token moves its earlier response tokens' log-probs."""
    rows = torch.arange(batch.input_ids.shape[0])
    last = batch.prompt_lengths + batch.response_mask.sum(-1) - 1
    ids = batch.input_ids.clone()
    ids[rows, last] = torch.where(ids[rows, last] == 5, 6, 5)
    with torch.no_grad():
        a = backbone.token_logps(model, batch)
        b = backbone.token_logps(model, _with(batch, input_ids=ids))
    earlier = batch.response_mask.clone()
    earlier[rows, last] = False
    return float((a - b)[earlier].abs().max())


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_responses_see_the_images_and_no_later_token(tiny, batches, family):
    backbone = _backbone(tiny(family))
    model = backbone.build().eval()
    for images in (1, 2):
        batch = batches(family, images)
        assert _future_leak(backbone, model, batch) == 0.0
        other = _with(batch, media={**batch.media, "pixel_values": batch.media["pixel_values"].flip(0)})
        with torch.no_grad():
            moved = backbone.token_logps(model, other) - backbone.token_logps(model, batch)
        assert moved[batch.response_mask].abs().max() > 1e-5  # the groups' images swapped (Qwen: patches reversed)


def test_paligemma_responses_are_the_causal_suffix(tiny, batches):
    # PaliGemma attends bidirectionally within its prefix (token type 0: image and prompt); responses are
    # the suffix (1). Marked 0 they would see their own later tokens on the naive path (the shared prompt pass
    # cuts the types to the prompt and runs the responses causally on its cache).
    batch = batches("paligemma2", 1)
    types, mask = batch.row_media()["token_type_ids"], batch.response_mask
    prompt = torch.arange(mask.shape[1])[None] < batch.prompt_lengths[:, None]
    assert types[prompt].eq(0).all() and types[~prompt].eq(1).all()
    backbone = _backbone(tiny("paligemma2"), shared_prefix=False)
    model = backbone.build().eval()
    as_prefix = _with(batch, media={**batch.media, "token_type_ids": torch.zeros_like(batch.media["token_type_ids"])})
    assert _future_leak(backbone, model, as_prefix) > 1e-4


def test_per_token_media_span_the_whole_row(tiny, batches):
    # Qwen2-VL's token types (1 on image tokens) and Llama 3.2 Vision's cross-attention mask come from
    # the processor for the prompt alone; the collator extends them over the responses.
    from transformers import AutoProcessor

    batch = batches("qwen2_vl", 2)
    image_id = AutoProcessor.from_pretrained(tiny("qwen2_vl")).tokenizer.convert_tokens_to_ids("<|image_pad|>")
    types = batch.row_media()["mm_token_type_ids"]
    assert types.shape == batch.input_ids.shape
    assert torch.equal(types, (batch.input_ids == image_id).long())

    batch = batches("mllama", 2)
    cross = batch.row_media()["cross_attention_mask"]  # (N, T, images, tiles)
    assert cross.shape[:2] == batch.input_ids.shape and cross.shape[2] == 2
    assert cross[batch.response_mask].eq(1).all()  # responses see both images
    first_image = (batch.input_ids == AutoProcessor.from_pretrained(tiny("mllama")).image_token_id).long().argmax(-1)
    cols = torch.arange(cross.shape[1])[None]
    assert cross[cols < first_image[:, None]].eq(0).all()  # tokens before the images see none


def test_default_lora_targets_keep_llavas_modules(tiny_llava):
    # the default before Idefics3's ``text_model`` joined it
    before = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4))
    base = backbone.load_pretrained()
    expected = {n for n, _ in base.named_modules() if re.fullmatch(before, n)}
    adapted = {n.removeprefix("base_model.model.") for n in _adapted(backbone.build())}
    assert adapted == expected and len(expected) == base.config.text_config.num_hidden_layers * len(PROJECTIONS)


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "paligemma2", "mllama"])
def test_predict_generates_what_generate_gives_for_each_prompt(tiny, batches, pair_files, world, family):
    # families whose processors return per-token inputs (spanning prompt and responses in a batch):
    # prediction cuts them back to the prompt, so its answers are generate's, one prompt at a time
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmpo.generation import generate_answers
    from mmpo.prediction import generate_from_batch

    path = tiny(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    batch = batches(family, 1)
    tok = processor.tokenizer
    _, responses = generate_from_batch(
        model, batch, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, max_new_tokens=6
    )
    rows = [json.loads(line) for line in pair_files[1].read_text().splitlines()][: batch.num_groups]
    images = [[Image.open(world / p).convert("RGB") for p in r["images"]] for r in rows]
    expected = generate_answers(model, processor, [r["prompt"] for r in rows], images, batch_size=1, max_new_tokens=6)
    assert [tok.decode(r, skip_special_tokens=True).strip() for r in responses] == [e.strip() for e in expected]


@pytest.fixture(scope="module")
def mixed_files(world, tmp_path_factory):
    """Two-pair files whose prompts differ in image count (1 and 2) or in image size (64 × 64 and 64 × 32),
    and each pair alone."""
    from PIL import Image

    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:2]]
    out = tmp_path_factory.mktemp("mixed-media")  # the files' data root
    (out / "images").mkdir()
    first, second = (Image.open(world / r["images"][0]).convert("RGB") for r in rows)
    first.save(out / "images" / "a.png")
    second.save(out / "images" / "b.png")
    second.crop((0, 0, 64, 32)).save(out / "images" / "wide.png")
    rows = [{**rows[0], "images": ["images/a.png"]}, {**rows[1], "images": ["images/b.png"]}]
    two = ["images/b.png", "images/a.png"]
    sets = {
        "counts": [rows[0], {**rows[1], "images": two, "prompt": "<image> <image> " + rows[1]["prompt"]}],
        "sizes": [rows[0], {**rows[1], "images": ["images/wide.png"]}],
    }
    files = {}
    for name, records in sets.items():
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
        for i, r in enumerate(records):
            files[name, i] = out / f"{name}-{i}.jsonl"
            files[name, i].write_text(json.dumps(r) + "\n")
    return files


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["counts", "sizes"])
@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_prompts_with_different_image_counts_or_sizes_share_a_batch(tiny, mixed_files, family, mix):
    # the collator zero-pads what the family's processor returns per prompt (Idefics3's images axis, Mllama's
    # images axis, Pixtral's pixels) as the processor pads a batch itself: each pair's log-probs are its own
    path = tiny(family)
    backbone = _backbone(path)
    model = backbone.build().eval()

    def first(file, size):
        dm = ImagePreferenceDataModule(
            str(path), train_file=str(file), data_root=str(file.parent), loader={"batch_size": size, "shuffle": False}
        )
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    with torch.no_grad():
        together = backbone.statistics(model, first(mixed_files[mix], 2)).logps  # (2 pairs, 2 responses)
        alone = torch.cat([backbone.statistics(model, first(mixed_files[mix, i], 1)).logps for i in range(2)])
    if family == "mllama" and mix == "counts":
        # Mllama's text rows that see no image yet (the template's tokens before <|image|>) attend with
        # a zeroed mask over every image slot, so the padded slot of the one-image prompt reaches its numbers
        # (transformers' own batching does the same); the two-image prompt is unpadded and exact
        torch.testing.assert_close(together[1], alone[1], atol=1e-5, rtol=1e-5)
        assert 0 < (together[0] - alone[0]).abs().max() < 1e-2
        return
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-5)
