"""Video input for LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL: the tiny builds on mp4 clips, batched and trained.

The tiny builds of ``mmpo.tiny.families`` take videos as built: their chat templates write the family's
video placeholder and their processors carry a video processor. Here they read the video world's mp4
files (8 frames of 32 x 32 at 8 fps) through :class:`VideoPreferenceDataModule`: the video tokens of
each row are the processor's for its clip, each row's media are its own clip (the other clip for the
rejected side of a VDPO pair), the statistics of a batch are those of each group run alone, and LoRA DPO
trains. The two real-checkpoint video configs are built with loading pointed at the family's tiny build,
and their frame and pixel settings are traced to the token counts. docs/models.md ("Video") sums it up.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers.callbacks import LossesInMemory
from helpers.equivalence import assert_same_logps_losses_and_gradients, comparison_module
from helpers.trainers import quiet_trainer

from datamodules import PreferenceBatch, VideoPreferenceDataModule, read_video
from datamodules.worlds.video import vocabulary
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule
from mmpo.tiny.families import TINY_FAMILIES

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["llava_onevision", "qwen2_vl", "qwen2_5_vl"]
FRAMES = 8  # every frame of the world's clips
# The placeholder a prompt's video expands to, and the markers the family's template writes around it.
VIDEO_TOKEN = {"llava_onevision": "<video>", "qwen2_vl": "<|video_pad|>", "qwen2_5_vl": "<|video_pad|>"}
MARKERS = {
    "llava_onevision": ["<|im_start|>", "<|im_end|>"],
    "qwen2_vl": ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>"],
    "qwen2_5_vl": ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>"],
}
# Video tokens per 8-frame clip. OneVision: 4 x 4 patches per frame pooled to 2 x 2, and one row end per
# clip (8 * 4 + 1). Qwen: 2 frames per temporal patch, 8 x 8 patches merged 2 x 2 (4 * 16).
TOKENS_PER_CLIP = {"llava_onevision": 33, "qwen2_vl": 64, "qwen2_5_vl": 64}
LN2 = math.log(2)


@pytest.fixture(scope="module")
def records(video_world):
    """The training records of the shared video world (tests/conftest.py: 8-frame clips of 32 pixels)."""
    return [json.loads(line) for line in Path(video_world["train"]).read_text().splitlines()]


@pytest.fixture(scope="module")
def files(video_world, records, tmp_path_factory):
    """``pairs``: the world's pairs; ``vdpo``: each pair's chosen response twice, the rejected side on the
    next record's clip."""
    out = tmp_path_factory.mktemp("video-pairs")
    vdpo = [
        {**r, "rejected": r["chosen"], "rejected_videos": records[(i + 1) % len(records)]["videos"]}
        for i, r in enumerate(records)
    ]
    (out / "vdpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vdpo))
    return {"pairs": Path(video_world["train"]), "vdpo": out / "vdpo.jsonl"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(family)``: the family's tiny build over the video world's words, built on first use."""
    root = tmp_path_factory.mktemp("video-families")
    return lambda family: TINY_FAMILIES[family](root / family, words=vocabulary(), seed=0)


def _datamodule(path, data_file, video_world, batch_size=2, **kw) -> VideoPreferenceDataModule:
    loader = {"batch_size": batch_size, "shuffle": False}
    frames = kw.pop("frames", {"num_frames": FRAMES})
    return VideoPreferenceDataModule(
        str(path), train_file=str(data_file), data_root=video_world["root"], loader=loader, frames=frames, **kw
    )


def _batches(path, data_file, video_world, batch_size=2, **kw) -> list[PreferenceBatch]:
    dm = _datamodule(path, data_file, video_world, batch_size, **kw)
    dm.setup("fit")
    return list(dm.train_dataloader())


def _row_clips(batch: PreferenceBatch) -> list[torch.Tensor]:
    """The video pixels each of the N rows sees, from ``row_media()``."""
    media = batch.row_media()
    pixels = media["pixel_values_videos"]
    if "video_grid_thw" in media:  # Qwen: every clip's patches one after another, (sum of t*h*w, C*2*P*P)
        return list(pixels.split(media["video_grid_thw"].prod(-1).tolist()))
    return list(pixels)  # OneVision: (N, frames, 3, H, W)


def _alone(processor, clip: Path) -> tuple[torch.Tensor, int, list[str]]:
    """A clip's pixels, video token count and tokens from the processor itself (decoded here, not batched)."""
    frames, _ = read_video(clip, FRAMES)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe the video ."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], videos=[frames.numpy()], return_tensors="pt")
    pixels = enc["pixel_values_videos"]
    tokens = processor.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    return (pixels if "video_grid_thw" in enc else pixels[0]), tokens.count(processor.video_token), tokens


def _video_counts(batch: PreferenceBatch, processor) -> list[int]:
    return (batch.input_ids == processor.video_token_id).sum(-1).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_holds_its_clips_video_tokens_and_pixels(tiny, files, video_world, records, family):
    from transformers import AutoProcessor

    path = tiny(family)
    processor = AutoProcessor.from_pretrained(path)
    assert processor.video_token == VIDEO_TOKEN[family]
    alone = [_alone(processor, Path(video_world["root"]) / r["videos"][0]) for r in records[:2]]
    for _, count, tokens in alone:  # the template writes the family's markers; the processor expands the video
        assert count == TOKENS_PER_CLIP[family] and all(m in tokens for m in MARKERS[family])
        assert processor.tokenizer.unk_token not in tokens
    assert not torch.equal(alone[0][0], alone[1][0])  # two different clips

    batch = _batches(path, files["pairs"], video_world)[0]
    assert batch.shared_prompt and batch.num_groups == 2
    assert _video_counts(batch, processor) == [TOKENS_PER_CLIP[family]] * 4
    if "video_grid_thw" in batch.media:  # Qwen: the count is the grid's, merged 2 x 2
        assert batch.media["video_grid_thw"].tolist() == [[FRAMES // 2, 8, 8]] * 2
    # row k*B + b is group b's response k: rows 0 and 2 see record 0's clip, rows 1 and 3 record 1's
    for row, pixels in enumerate(_row_clips(batch)):
        torch.testing.assert_close(pixels, alone[row % 2][0], atol=0, rtol=0)
    if "mm_token_type_ids" in batch.media:  # Qwen: 2 on video tokens, extended over the responses as text
        types = batch.row_media()["mm_token_type_ids"]
        assert torch.equal(types, 2 * (batch.input_ids == processor.video_token_id).long())


@pytest.mark.parametrize("family", FAMILIES)
def test_vdpo_rejected_row_sees_the_other_clip_and_equals_it_alone(tiny, files, video_world, records, family):
    from transformers import AutoProcessor

    path = tiny(family)
    processor = AutoProcessor.from_pretrained(path)
    batch = _batches(path, files["vdpo"], video_world)[0]
    assert not batch.shared_prompt
    assert torch.equal(batch.input_ids[0], batch.input_ids[2])  # same text and token count, different clips
    assert _video_counts(batch, processor) == [TOKENS_PER_CLIP[family]] * 4
    clips = [_alone(processor, Path(video_world["root"]) / r["videos"][0])[0] for r in records[:3]]
    # chosen rows: records 0 and 1 on their clips; rejected rows: the same texts on clips 1 and 2
    for row, pixels in enumerate(_row_clips(batch)):
        torch.testing.assert_close(pixels, clips[row % 2 + row // 2], atol=0, rtol=0)

    module = comparison_module(path, lora=True)
    with torch.no_grad():
        _, policy, reference = module.compute(batch)
    # each row's statistics are those of its text on its clip in an ordinary pair of its own (its chosen row)
    alone = Path(files["vdpo"]).with_name(f"alone-{family}.jsonl")
    rows = [
        {**records[b], "id": f"{b}-{k}", "videos": records[b + k]["videos"], "rejected": "the video ."}
        for k in (0, 1)
        for b in (0, 1)
    ]
    alone.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with torch.no_grad():
        singles = [module.compute(b)[1:] for b in _batches(path, alone, video_world, batch_size=1)]
    got = torch.stack([policy.logps.T.flatten(), reference.logps.T.flatten()])  # rows in batch order
    want = torch.stack([torch.cat([p.logps[:, 0] for p, _ in singles]), torch.cat([r.logps[:, 0] for _, r in singles])])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (policy.logps[:, 0] - policy.logps[:, 1]).abs().min() > 1e-4  # the clip changes the same text's log-prob


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_statistics_equal_each_group_alone(tiny, files, video_world, family):
    path = tiny(family)
    batch = _batches(path, files["pairs"], video_world)[0]
    module = comparison_module(path, lora=True)
    with torch.no_grad():
        out, policy, reference = module.compute(batch)
        alone = [module.compute(b) for b in _batches(path, files["pairs"], video_world, batch_size=1)[:2]]
    torch.testing.assert_close(policy.logps, torch.cat([a[1].logps for a in alone]), atol=1e-5, rtol=1e-5)  # (B, K)
    torch.testing.assert_close(reference.logps, torch.cat([a[2].logps for a in alone]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.losses, torch.cat([a[0].losses for a in alone]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(policy.tokens, torch.cat([a[1].tokens for a in alone]), atol=0, rtol=0)
    assert not torch.equal(policy.logps, reference.logps)  # the adapter's B matrices are drawn: it acts
    # the shared prompt pass takes every family's videos (Qwen's with their multimodal rotary positions
    # continued over the responses); the naive path agrees, gradients included
    naive = comparison_module(path, lora=True, shared_prefix=False)
    assert_same_logps_losses_and_gradients(module, naive, batch)


def test_qwen2_5_vl_timing_follows_the_decoded_frames(tiny, files, video_world):
    # Qwen2.5-VL spaces a video's temporal positions by its seconds per temporal patch (2 frames), which the
    # processor reads from the clip's metadata: 2 / 8 s for all 8 frames of an 8 fps clip, 2 / 4 s for the
    # 4 frames kept at 4 fps. Without metadata transformers would assume 24 fps.
    from transformers import AutoProcessor

    path = tiny("qwen2_5_vl")
    batch = _batches(path, files["pairs"], video_world)[0]
    torch.testing.assert_close(batch.media["second_per_grid_ts"], torch.full((2,), 2 / 8))
    assert batch.row_media()["second_per_grid_ts"].shape == (4,)
    fps = {"num_frames": FRAMES, "frame_sampling": "fps", "target_fps": 4.0}
    half = _batches(path, files["pairs"], video_world, frames=fps)[0]
    torch.testing.assert_close(half.media["second_per_grid_ts"], torch.full((2,), 2 / 4))
    assert _video_counts(half, AutoProcessor.from_pretrained(path)) == [TOKENS_PER_CLIP["qwen2_5_vl"] // 2] * 4

    module = comparison_module(path, lora=False)
    assumed = PreferenceBatch(
        **{**batch.__dict__, "media": {**batch.media, "second_per_grid_ts": torch.full((2,), 2 / 24)}}
    )
    with torch.no_grad():
        moved = module.backbone.token_logps(module.policy, assumed) - module.backbone.token_logps(module.policy, batch)
    assert moved[batch.response_mask].abs().max() > 1e-5  # the timing reaches the positions


@pytest.mark.parametrize("data", ["pairs", "vdpo"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_dpo_trains_on_videos(tiny, files, video_world, family, data):
    path = tiny(family)
    torch.manual_seed(0)  # the adapter's A matrices
    module = PreferenceModule(
        VisionLanguageBackbone(str(path), lora=LoraSettings(r=4, alpha=8, dropout=0.0)),
        DPOLoss(beta=0.1),
        reference="adapter",
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    record = LossesInMemory()
    quiet_trainer(max_steps=3, callbacks=[record]).fit(module, datamodule=_datamodule(path, files[data], video_world))
    assert len(record.losses) == 3 and all(math.isfinite(x) for x in record.losses)
    assert record.losses[0] == pytest.approx(LN2, abs=1e-5)  # a fresh adapter is its own reference
    after = dict(module.policy.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)


# (config, tiny family, checkpoint set on the command line or None, model class, video tokens of a world clip
# as the config samples and bounds it)
CONFIGS = [
    # 16 frames of the 8-frame clip (each twice): 16 * 4 + 1
    ("llava_onevision_7b_vdpo_lora", "llava_onevision", None, "LlavaOnevisionForConditionalGeneration", 16 * 4 + 1),
    # 2 fps: frames 0 and 4 of the 1 s clip, one temporal patch; the 1,024-pixel frames are scaled up to the
    # 100,352-pixel minimum: 320 x 320, 80 x 80 patches merged 2 x 2 (the tiny build's 4-pixel patches)
    ("qwen2vl_2b_video_dpo_lora", "qwen2_vl", None, "Qwen2VLForConditionalGeneration", 40 * 40),
    # the same config for Qwen2.5-VL, as its header says: the checkpoint changed, nothing else
    (
        "qwen2vl_2b_video_dpo_lora",
        "qwen2_5_vl",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "Qwen2_5_VLForConditionalGeneration",
        1600,
    ),
]
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize(
    ("config", "family", "checkpoint", "model_class", "tokens"), CONFIGS, ids=[f"{c}-{f}" for c, f, *_ in CONFIGS]
)
def test_video_config_builds_with_the_familys_tiny_model_and_sets_the_processor(
    tiny, files, video_world, config, family, checkpoint, model_class, tokens, monkeypatch
):
    from transformers import AutoModelForImageTextToText

    from mmpo.cli import MMPOCLI

    path = tiny(family)
    config = REPO / "configs" / f"{config}.yaml"
    spec = yaml.safe_load(config.read_text())
    loaded = []

    def load(self):  # the checkpoint's id reaches the loader, which builds the tiny model instead
        loaded.append(self.model_name_or_path)
        return AutoModelForImageTextToText.from_pretrained(path)

    monkeypatch.setattr(VisionLanguageBackbone, "load_pretrained", load)
    args = ["--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1"]
    if checkpoint is not None:
        args.append(f"--model.init_args.backbone.init_args.model_name_or_path={checkpoint}")
    args += [f"--data.init_args.processor={path}", f"--data.init_args.train_file={files['pairs']}"]
    args += [f"--data.init_args.data_root={video_world['root']}", "--data.init_args.loader.num_workers=0"]
    cli = MMPOCLI(args=args, run=False)
    cli.model.configure_model()
    want = checkpoint or spec["model"]["init_args"]["backbone"]["init_args"]["model_name_or_path"]
    assert loaded == [want] and type(cli.model.policy.get_base_model()).__name__ == model_class
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[1] for n, _ in cli.model.policy.named_parameters() if ".lora_A" in n
    }
    assert adapted == PROJECTIONS  # the default LoRA targets find the family's language model
    data = spec["data"]["init_args"]
    assert cli.datamodule.frames.num_frames == data["frames"]["num_frames"]
    assert cli.datamodule.processor_kwargs == data.get("processor_kwargs", {})
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert _video_counts(batch, cli.datamodule.processor) == [tokens] * 2 * batch.num_groups
