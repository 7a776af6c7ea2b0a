"""Online video negatives (VDPO) and PaMi-VDPO's candidate selection, end to end on real mp4 files."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from helpers.trainers import quiet_trainer

from datamodules import VideoNegativeSettings, VideoVDPODataModule
from datamodules.core.records import BadSampleError
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.divergence import js_divergence
from mmpo.losses import DPOLoss, MultiInstanceVDPOLoss
from mmpo.module import PreferenceModule
from mmpo.pami import PaMiSelector

FIXED = ["reverse", "static", "color_jitter"]


def _datamodule(video_llava, video_world, negatives, batch_size=2, **kwargs) -> VideoVDPODataModule:
    return VideoVDPODataModule(
        str(video_llava),
        train_file=str(video_world["train"]),
        loader={"batch_size": batch_size, "shuffle": False},
        negatives=negatives,
        **{"frames": {"num_frames": 4}, **kwargs},
    )


def _module(video_llava, loss, candidates=None) -> PreferenceModule:
    torch.manual_seed(0)
    backbone = VisionLanguageBackbone(str(video_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-2)
    return PreferenceModule(backbone, loss, optimizer=optimizer, candidates=candidates)


def test_a_vdpo_pair_is_the_response_under_the_original_and_an_augmented_clip(video_llava, video_world):
    dm = _datamodule(video_llava, video_world, {"augmentations": ["reverse"], "num_candidates": 1})
    dm.setup("fit")
    dataset = dm.datasets["train"]
    item = dataset[0]
    original = item["videos"][0]  # (4, 32, 32, 3) uint8
    (rejected,) = item["response_media"][1][1]
    assert torch.equal(rejected, original.flip(0))  # the reversed clip
    assert item["responses"] == [item["record"].chosen] * 2 and item["candidate_names"] == ["reverse"]
    batch = next(iter(dm.train_dataloader()))
    b = batch.num_groups
    assert (batch.group_size, b, batch.shared_prompt) == (2, 2, False)
    assert batch.response_tags == (("original", "reverse"),) * 2
    videos = batch.media["pixel_values_videos"]  # (N, T, C, H, W): one clip per row
    assert videos.shape[0] == 2 * b
    for g in range(b):  # same text, and the rejected row's clip is the chosen row's, reversed
        chosen, other = batch.input_ids[g], batch.input_ids[b + g]
        assert torch.equal(chosen, other)
        assert torch.allclose(videos[b + g], videos[g].flip(0))


def test_candidates_are_a_function_of_seed_epoch_and_record(video_llava, video_world):
    negatives = {"augmentations": ["shuffle", "crop", "frame_drop", "mask"], "num_candidates": 2}
    first, second = (_datamodule(video_llava, video_world, negatives) for _ in range(2))
    for dm in (first, second):
        dm.setup("fit")
    a, b = first.datasets["train"][3], second.datasets["train"][3]
    assert a["candidate_names"] == b["candidate_names"]
    assert all(torch.equal(x[1][0], y[1][0]) for x, y in zip(a["response_media"], b["response_media"], strict=True))
    second.datasets["train"].set_epoch(1)
    c = second.datasets["train"][3]
    pairs = zip(a["response_media"][1:], c["response_media"][1:], strict=True)
    assert not all(torch.equal(x[1][0], y[1][0]) for x, y in pairs)  # a new epoch, new candidates


def test_bad_negative_settings_and_records_are_clear_errors(video_llava, video_world, tmp_path):
    with pytest.raises(ValueError, match="larger than the augmentation set"):
        VideoNegativeSettings(augmentations=["reverse", "crop"], num_candidates=3)
    with pytest.raises(ValueError, match="unknown augmentation"):
        VideoNegativeSettings(augmentations=["rewind"])
    with pytest.raises(ValueError, match="num_candidates must equal"):
        VideoNegativeSettings(augmentations=FIXED, num_candidates=2, sampling="fixed")
    # a still video: reversing it gives the same clip, so there is no negative to learn from
    from datamodules.vision_text.video_io import write_video

    still = tmp_path / "still.mp4"
    write_video(still, torch.full((8, 32, 32, 3), 90, dtype=torch.uint8))
    record = {"id": "still-1", "prompt": "<video> describe the video .", "videos": ["still.mp4"], "response": "x"}
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    world = {"train": tmp_path / "train.jsonl"}
    dm = _datamodule(video_llava, world, {"augmentations": ["reverse"]})
    dm.setup("fit")
    with pytest.raises(BadSampleError, match=r"still-1|train.jsonl:1.*identical to the original"):
        dm.datasets["train"][0]
    skipping = _datamodule(video_llava, world, {"augmentations": ["reverse"]}, on_bad_sample="skip")
    skipping.setup("fit")
    assert next(iter(skipping.train_dataloader())).skipped == 1
    (tmp_path / "train.jsonl").write_text(json.dumps({**record, "response": None}) + "\n")
    with pytest.raises(BadSampleError, match="missing field 'response'"):
        _datamodule(video_llava, world, {"augmentations": ["reverse"]}).setup("fit")
    with pytest.raises(ValueError, match="cannot be cached"):
        dm.cache_settings("train")


def test_pami_scores_are_the_reference_models_js_divergence_per_candidate(video_llava, video_world):
    dm = _datamodule(video_llava, video_world, {"augmentations": FIXED, "num_candidates": 3, "sampling": "fixed"})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    selector = PaMiSelector(num_selected=1)
    module = _module(video_llava, MultiInstanceVDPOLoss(), selector)
    module.configure_model()
    module.policy.eval()
    scores = selector.scores(module, batch)  # (B, 3)
    b, k1 = batch.num_groups, batch.group_size
    # independently: full logits of each row alone, the base model (adapter off), response positions
    base = module.backbone.unwrap(module.policy)
    prompts, counts = batch.host_lengths()
    with torch.no_grad(), module.backbone.adapters_disabled(module.policy):
        for g in range(b):
            rows = [j * b + g for j in range(k1)]
            dists = []
            for r in rows:
                media = {key: v[r : r + 1] for key, v in batch.media.items()}
                length = prompts[r] + counts[r]
                logits = base(input_ids=batch.input_ids[r : r + 1, :length], **media).logits[0].double()
                dists.append(logits[prompts[r] - 1 : length - 1])  # (R, V): the positions predicting the response
            for c in range(1, k1):
                want = js_divergence(dists[0], dists[c]).mean()
                assert scores[g, c - 1].item() == pytest.approx(want.item(), abs=2e-5), (g, c)
    assert ((scores >= 0) & (scores <= math.log(2))).all()
    static = FIXED.index("static")
    assert (scores[:, static] > 0).all()  # a still clip changes what the model predicts
    # the scoring pass doubles as the reference pass: its log-probs of the kept rows are what the
    # module's reference strategy (the disabled adapter) computes on the kept batch
    kept, weights, reference = selector.select(module, batch, "train")
    assert kept.group_size == 2 and weights.shape == (b, 2)
    want = module.reference.statistics(module, kept, "train")
    torch.testing.assert_close(reference.logps, want.logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference.token_logps, want.token_logps, rtol=0, atol=1e-5)
    assert torch.equal(reference.tokens, want.tokens)


class _RecordSelections(__import__("lightning").Callback):
    def __init__(self) -> None:
        self.keeps: list[list[list[int]]] = []
        self.scores: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keeps.append(pl_module.candidates.last["keep"].tolist())
        self.scores.append(pl_module.candidates.last["scores"].clone())


@pytest.mark.slow
def test_vdpo_and_pami_train_and_a_resume_mid_epoch_reproduces_the_selection(video_llava, video_world, tmp_path):
    # VDPO: one random candidate per record, plain DPO on the pair
    dm = _datamodule(video_llava, video_world, {"num_candidates": 1})
    trainer = quiet_trainer(max_steps=2, default_root_dir=str(tmp_path / "vdpo"))
    trainer.fit(_module(video_llava, DPOLoss()), datamodule=dm)
    assert math.isfinite(float(trainer.logged_metrics["train/loss_step"]))

    # PaMi: three candidates, one kept by the close-to-far schedule, the multi-instance loss
    negatives = {"augmentations": FIXED, "num_candidates": 3, "sampling": "fixed"}

    def run(root, max_steps, ckpt_path=None, every=None):
        record = _RecordSelections()
        callbacks = [record]
        if every:
            from lightning.pytorch.callbacks import ModelCheckpoint

            callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1))
        trainer = quiet_trainer(
            max_steps=max_steps, default_root_dir=str(root), callbacks=callbacks, enable_checkpointing=bool(every)
        )
        selector = PaMiSelector(num_selected=1)
        module = _module(video_llava, MultiInstanceVDPOLoss(), selector)
        trainer.fit(module, datamodule=_datamodule(video_llava, video_world, negatives), ckpt_path=ckpt_path)
        return trainer, record

    trainer, whole = run(tmp_path / "whole", 4, every=2)
    metrics = trainer.logged_metrics
    assert math.isfinite(float(metrics["train/loss_step"]))
    for tag in FIXED:
        assert 0 <= float(metrics[f"train/pami/score/{tag}"]) <= math.log(2)
    assert len(whole.keeps) == 4 and all(row[0] == 0 and 1 <= row[1] <= 3 for keep in whole.keeps for row in keep)
    # epochs of 3 steps (6 records, batch 2): the checkpoint after step 2 is mid-epoch
    checkpoint = next((tmp_path / "whole" / "ckpt").glob("*step=2.ckpt"))
    _, resumed = run(tmp_path / "resumed", 4, ckpt_path=str(checkpoint))
    assert resumed.keeps == whole.keeps[2:]
    for got, want in zip(resumed.scores, whole.scores[2:], strict=True):  # the same model state scored them
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert len({tuple(map(tuple, keep)) for keep in whole.keeps}) > 1  # the choices vary between steps


def test_select_responses_keeps_each_groups_own_choice_of_rows_and_media():
    from datamodules.core.batch import PreferenceBatch

    b, k, t = 2, 3, 5
    n = b * k
    ids = torch.arange(n * t).view(n, t)  # row r holds r*t .. r*t + t-1
    batch = PreferenceBatch(
        input_ids=ids,
        attention_mask=torch.ones(n, t, dtype=torch.long),
        response_mask=torch.zeros(n, t, dtype=torch.bool),
        prompt_lengths=torch.full((n,), t),
        media={"pixel_values_videos": torch.arange(n).float().view(n, 1, 1).repeat(1, 2, 3)},  # one clip per row
        ids=["a", "b"],
        shared_prompt=False,
        group_size=k,
        scores=torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]),
        response_tags=(("original", "reverse", "static"), ("original", "crop", "blur")),
    )
    kept = batch.select_responses(torch.tensor([[0, 2], [0, 1]]))
    # response-major rows: group 0's response 0, group 1's response 0, group 0's response 2, group 1's response 1
    want_rows = [0 * b + 0, 0 * b + 1, 2 * b + 0, 1 * b + 1]
    assert torch.equal(kept.input_ids, ids[want_rows])
    assert kept.media["pixel_values_videos"][:, 0, 0].tolist() == [float(r) for r in want_rows]
    assert kept.scores.tolist() == [[0.0, 2.0], [3.0, 4.0]] and kept.group_size == 2
    assert kept.response_tags == (("original", "static"), ("original", "crop"))
    ragged = PreferenceBatch(**{**batch.__dict__, "media": {"pixel_values_videos": torch.zeros(n + 1, 2)}})
    with pytest.raises(ValueError, match="rows of different sizes"):
        ragged.select_responses(torch.tensor([[0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="outside 0..2"):
        batch.select_responses(torch.tensor([[0, 3], [0, 1]]))


def test_short_videos_and_oversized_frames_are_bad_samples_named_by_record(video_llava, tmp_path):
    from datamodules.vision_text.video_io import write_video

    write_video(tmp_path / "big.mp4", torch.zeros((8, 64, 64, 3), dtype=torch.uint8) + 40)
    write_video(tmp_path / "short.mp4", torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8))
    rows = [
        {"id": "big", "prompt": "<video> describe the video .", "videos": ["big.mp4"], "response": "x"},
        {"id": "short", "prompt": "<video> describe the video .", "videos": ["short.mp4"], "response": "x"},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    world = {"train": tmp_path / "train.jsonl"}
    frames = {"num_frames": 4, "min_frames": 4, "max_pixels": 32 * 32}
    dm = _datamodule(video_llava, world, {"augmentations": ["shuffle"]}, frames=frames)
    dm.setup("fit")
    with pytest.raises(BadSampleError, match=r"train.jsonl:1: video .*big.mp4 is 64x64 \(4096 pixels a frame\)"):
        dm.datasets["train"][0]
    with pytest.raises(BadSampleError, match=r"train.jsonl:2: video .*short.mp4 has 3 frames, fewer than"):
        dm.datasets["train"][1]
    skipping = _datamodule(video_llava, world, {"augmentations": ["shuffle"]}, frames=frames, on_bad_sample="skip")
    skipping.setup("fit")
    assert next(iter(skipping.train_dataloader())).skipped == 2
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        _datamodule(video_llava, world, {}, frames={"max_pixels": 0})


def test_select_responses_refuses_flattened_patches_of_different_sizes():
    from datamodules.core.batch import PreferenceBatch

    n, t = 4, 3
    batch = PreferenceBatch(
        input_ids=torch.zeros(n, t, dtype=torch.long),
        attention_mask=torch.ones(n, t, dtype=torch.long),
        response_mask=torch.zeros(n, t, dtype=torch.bool),
        prompt_lengths=torch.full((n,), t),
        # 12 patches for 4 rows would divide evenly, but the rows hold 2, 4, 2 and 4 of them
        media={"pixel_values_videos": torch.zeros(12, 8), "video_grid_thw": torch.tensor([[1, 1, 2], [1, 2, 2]] * 2)},
        shared_prompt=False,
        group_size=2,
    )
    with pytest.raises(ValueError, match="different numbers of patches"):
        batch.select_responses(torch.tensor([[0, 1], [0, 1]]))
