"""Video preference pairs end to end: decord decoding, a video-LLM processor, VDPO pairs."""

import json

import numpy as np
import pytest
import torch

from datamodules import BadSampleError, PreferenceDataset, VisionPreferenceCollator, load_preference_records
from datamodules.vision_text.video_io import write_video
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule

FRAMES = 4
TOKENS_PER_FRAME = 4  # 32 px / patch 8 = 4x4 patches, 2x2-pooled


@pytest.fixture(scope="module")
def video_llava(tmp_path_factory):
    from datamodules.worlds.shapes import vocabulary
    from mmpo.tiny.llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("vmodel") / "tiny", vocabulary(), image_size=32, video=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for name, step in (("right.mp4", 4), ("left.mp4", -4)):
        frames = np.full((12, 32, 32, 3), 200, dtype=np.uint8)
        for t in range(12):
            x = 12 + step * (t - 6) // 2
            frames[t, 12:20, max(x, 0) : max(x + 8, 0)] = (220, 30, 30)
        write_video(root / name, frames, fps=8)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    return root


def _records(clips, rows):
    path = clips / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _collate(video_llava, path, on_bad_sample="error"):
    from transformers import AutoProcessor

    records, _ = load_preference_records(path, on_bad_sample=on_bad_sample)
    ds = PreferenceDataset(records, on_bad_sample, num_frames=FRAMES)
    collator = VisionPreferenceCollator(AutoProcessor.from_pretrained(video_llava), on_bad_sample=on_bad_sample)
    return collator([ds[i] for i in range(len(ds))])


def _module(video_llava, shared):
    torch.manual_seed(0)
    bb = VisionLanguageBackbone(str(video_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0), shared_prefix=shared)
    m = PreferenceModule(bb, DPOLoss(beta=0.1))
    m.configure_model()
    with torch.no_grad():
        for n, p in m.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m.eval()


def test_video_pairs_collate_and_shared_prefix_matches_naive(video_llava, clips):
    path = _records(
        clips,
        [
            {"id": "a", "videos": ["right.mp4"], "prompt": "which way does the red square move ?",
             "chosen": "the red square moves right .", "rejected": "the red square moves left ."},
            {"id": "b", "videos": ["left.mp4"], "prompt": "<video> describe the image .",
             "chosen": "a red square .", "rejected": "a blue circle and a red square ."},
        ],
    )  # fmt: skip
    batch = _collate(video_llava, path)
    video_id = 5  # "<video>" in the tiny vocabulary
    assert [(row == video_id).sum().item() for row in batch.input_ids] == [FRAMES * TOKENS_PER_FRAME] * 4
    assert batch.media["pixel_values_videos"].shape == (2, FRAMES, 3, 32, 32) and batch.shared_prompt
    shared, naive = _module(video_llava, True), _module(video_llava, False)
    torch.testing.assert_close(
        shared.backbone.token_logps(shared.policy, batch), naive.backbone.token_logps(naive.policy, batch),
        atol=2e-5, rtol=1e-5,
    )  # fmt: skip


def test_vdpo_pairs_with_different_rejected_videos(video_llava, clips):
    # VDPO: the response is fixed, the rejected side sees another (here: reversed-motion) video
    text = "the red square moves right ."
    path = _records(
        clips,
        [{"id": "v", "videos": ["right.mp4"], "rejected_videos": ["left.mp4"],
          "prompt": "which way does the red square move ?", "chosen": text, "rejected": text}],
    )  # fmt: skip
    batch = _collate(video_llava, path)
    assert not batch.shared_prompt
    pv = batch.media["pixel_values_videos"]
    assert pv.shape[0] == 2 and not torch.equal(pv[0], pv[1])
    assert torch.equal(batch.input_ids[0], batch.input_ids[1])  # same tokens, different pixels
    module = _module(video_llava, True)
    with torch.no_grad():
        out, policy, reference = module.compute(batch)
    # Each side's log-probs are those of the same text on its own video alone: an ordinary pair per video,
    # through the naive forward, gives them as its chosen row.
    alone = _records(
        clips,
        [{"id": name, "videos": [f"{name}.mp4"], "prompt": "which way does the red square move ?", "chosen": text,
          "rejected": "the red square moves up ."} for name in ("right", "left")],
    )  # fmt: skip
    with torch.no_grad():
        _, naive_policy, naive_reference = _module(video_llava, False).compute(_collate(video_llava, alone))
    torch.testing.assert_close(policy.chosen, naive_policy.chosen[:1], atol=1e-4, rtol=1e-5)  # right.mp4
    torch.testing.assert_close(policy.rejected, naive_policy.chosen[1:], atol=1e-4, rtol=1e-5)  # left.mp4
    torch.testing.assert_close(reference.chosen, naive_reference.chosen[:1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(reference.rejected, naive_reference.chosen[1:], atol=1e-4, rtol=1e-5)
    assert abs(policy.chosen.item() - policy.rejected.item()) > 1e-3  # the video changes the same text's log-prob
    # and the loss is DPO's on those four numbers, by hand
    margin = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    torch.testing.assert_close(out.losses, -torch.nn.functional.logsigmoid(0.1 * margin), atol=1e-6, rtol=1e-5)


def test_broken_video_names_the_record_or_is_skipped(video_llava, clips):
    rows = [
        {"id": "bad", "videos": ["broken.mp4"], "prompt": "describe the image .", "chosen": "a .", "rejected": "b ."},
        {"id": "ok", "videos": ["left.mp4"], "prompt": "describe the image .", "chosen": "a .", "rejected": "b ."},
    ]
    path = _records(clips, rows)
    with pytest.raises(BadSampleError, match=r"pairs.jsonl:1.*broken.mp4"):
        _collate(video_llava, path)
    batch = _collate(video_llava, path, on_bad_sample="skip")
    assert batch.ids == ["ok"] and batch.skipped == 1


def test_placeholder_and_rejected_media_counts_are_checked(clips):
    path = _records(
        clips,
        [{"videos": ["left.mp4"], "rejected_videos": ["left.mp4", "right.mp4"], "prompt": "q", "chosen": "a",
          "rejected": "a"}],
    )  # fmt: skip
    with pytest.raises(BadSampleError, match="1 video placeholder.*2 rejected_videos"):
        load_preference_records(path)


def test_video_datamodule_batches_with_random_segments(video_llava, clips):
    from datamodules import VideoPreferenceDataModule

    other = {"right": "left", "left": "right"}
    rows = [
        {"id": f"r{i}", "videos": [name], "prompt": "which way does the red square move ?",
         "chosen": f"the red square moves {d} .", "rejected": f"the red square moves {other[d]} ."}
        for i, (name, d) in enumerate([("right.mp4", "right"), ("left.mp4", "left")] * 2)
    ]  # fmt: skip
    path = _records(clips, rows)
    dm = VideoPreferenceDataModule(
        str(video_llava), train_file=str(path), val_file=str(path), loader={"batch_size": 4},
        frames={"num_frames": FRAMES, "frame_sampling": "random_segment"},
    )  # fmt: skip
    dm.setup("fit")
    assert dm.datasets["train"].frame_sampling == "random_segment"
    assert dm.datasets["val"].frame_sampling == "uniform"
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_pairs == 4 and batch.media["pixel_values_videos"].shape[:2] == (4, FRAMES)
