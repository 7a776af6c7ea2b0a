"""DenseDPO: per-segment labels in the data, per-segment statistics from the backbone, the loss by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from helpers.diffusion import strip_datamodule  # noqa: E402

from datamodules.core.records import BadSampleError  # noqa: E402
from datamodules.diffusion.module import DiffusionPreferenceDataModule  # noqa: E402
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS  # noqa: E402
from mmpo.losses import DenseDPOLoss, DPOLoss, ResponseStats, dense_dpo_loss  # noqa: E402
from mmpo.module import PreferenceModule  # noqa: E402


def stats(token_logps, labels=None):
    parts = torch.tensor(token_logps, dtype=torch.float64)  # (B, 2, S)
    return ResponseStats(
        logps=parts.sum(-1), tokens=torch.ones(parts.shape[:2]), token_logps=parts, mask=torch.ones_like(parts),
        segment_labels=None if labels is None else torch.tensor(labels, dtype=torch.float64),
    )  # fmt: skip


def test_the_loss_by_hand_and_all_ones_labels_give_diffusion_dpo():
    policy = stats([[[-0.1, -0.3, -0.2], [-0.4, -0.1, -0.5]]], [[1, -1, 0]])
    reference = stats([[[-0.2, -0.2, -0.2], [-0.3, -0.3, -0.3]]])
    beta = 5.0
    # Δ(0) = (0.1, -0.1, 0), Δ(1) = (-0.1, 0.2, -0.2); Σ l (Δ0 − Δ1) = 1·0.2 − 1·(−0.3) + 0 = 0.5
    expected = -math.log(1 / (1 + math.exp(-beta * 0.5)))
    out = DenseDPOLoss(beta)(policy, reference)
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    ones = stats(policy.token_logps.tolist(), [[1, 1, 1]])
    torch.testing.assert_close(DenseDPOLoss(beta)(ones, reference).losses, DPOLoss(beta)(ones, reference).losses)
    # a segment labelled 0 contributes nothing; flipping every label flips the logit
    flipped = dense_dpo_loss(policy.token_logps - reference.token_logps, -policy.segment_labels, beta)
    assert flipped.item() == pytest.approx(-math.log(1 / (1 + math.exp(beta * 0.5))), rel=1e-12)


def test_the_gradient_raises_the_preferred_segments():
    parts = torch.zeros(1, 2, 2, dtype=torch.float64, requires_grad=True)
    loss = dense_dpo_loss(parts, torch.tensor([[1.0, -1.0]], dtype=torch.float64), 1.0).sum()
    loss.backward()
    g = parts.grad[0]
    assert g[0, 0] < 0 and g[1, 0] > 0  # segment 0: image 0 better -> its log-prob goes up
    assert g[0, 1] > 0 and g[1, 1] < 0  # segment 1: image 1 better


def test_missing_labels_or_segments_are_clear_errors():
    with pytest.raises(ValueError, match="segment_labels"):
        DenseDPOLoss(1.0)(stats([[[-0.1], [-0.2]]]), stats([[[-0.1], [-0.2]]]))
    plain = ResponseStats(logps=torch.zeros(1, 2), tokens=torch.ones(1, 2), segment_labels=torch.ones(1, 2))
    with pytest.raises(ValueError, match="segments"):
        DenseDPOLoss(1.0)(plain, plain)
    with pytest.raises(ValueError, match="reports 1 segments but the records label 2"):
        DenseDPOLoss(1.0)(stats([[[-0.1], [-0.2]]], [[1, 1]]), stats([[[-0.1], [-0.2]]]))


def write_pairs(root, records):
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, extra in enumerate(records):
        names = []
        for k in range(2):
            names.append(f"img/{i}-{k}.png")
            Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(root / names[-1])
        record = {"id": f"r{i}", "caption": "a red circle .", "image_0": names[0], "image_1": names[1]}
        lines.append(json.dumps(record | extra) + "\n")
    (root / "train.jsonl").write_text("".join(lines))
    return root / "train.jsonl"


def load(train, **kwargs):
    return strip_datamodule(train, **kwargs)


def test_records_give_segment_labels_oriented_preferred_first(tmp_path):
    train = write_pairs(
        tmp_path,
        [
            {"segment_labels": [1, 0, -1, 1]},  # image_0 leads (sum > 0)
            {"segment_labels": [-1, -1, 0, 1]},  # image_1 leads: served first, labels negated
            {"segment_labels": [0, 0, 0, 0]},  # a tie: dropped with drop_ties
            {"label_0": 0, "segment_labels": [1, -1, -1, 1]},  # an explicit label decides the order
        ],
    )
    dm = load(train)
    batch = next(iter(dm.train_dataloader()))
    assert batch.ids == ["r0", "r1", "r3"]
    torch.testing.assert_close(batch.segment_labels, torch.tensor([[1.0, 0, -1, 1], [1, 1, 0, -1], [-1, 1, 1, -1]]))
    assert torch.equal(batch.side_info()["segment_labels"], batch.segment_labels)
    img = np.array(Image.open(tmp_path / "img/1-1.png"))
    assert torch.equal(batch.pixel_values[1], torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)


@pytest.mark.parametrize("labels", [[2, 0], [], "1,0", [True, False]])
def test_bad_segment_labels_name_the_record(tmp_path, labels):
    train = write_pairs(tmp_path, [{"segment_labels": [1, 1]}, {"segment_labels": labels}])
    with pytest.raises(BadSampleError, match="train.jsonl:2: 'segment_labels' must be a non-empty list"):
        load(train)


def test_records_with_different_segment_counts_cannot_share_a_batch(tmp_path):
    train = write_pairs(tmp_path, [{"segment_labels": [1, 1]}, {"segment_labels": [1, 1, 1]}])
    with pytest.raises(ValueError, match="segment_labels per record differ within a batch"):
        next(iter(load(train).train_dataloader()))


def test_segment_statistics_sum_to_the_image_statistic_and_densedpo_trains(diffusion_builds, tmp_path):
    import lightning as L

    train = write_pairs(tmp_path, [{"segment_labels": [1, -1]} for _ in range(4)])
    dm = load(train)
    batch = next(iter(dm.train_dataloader()))
    plain = DiffusionBackbone(str(diffusion_builds["sd15"]))
    dense = DiffusionBackbone(str(diffusion_builds["sd15"]), segments=2)
    model = plain.build().eval()
    with torch.no_grad():
        whole = plain.statistics(model, batch)
        parts = dense.statistics(model, batch)  # the same batch object: the same (t, ε)
    assert parts.token_logps.shape == (4, 2, 2)
    torch.testing.assert_close(parts.logps, whole.logps, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts.token_logps.sum(-1), parts.logps)
    with pytest.raises(ValueError, match="cannot be cut into 3 equal segments"):
        DiffusionBackbone(str(diffusion_builds["sd15"]), segments=3).statistics(model, batch)

    lora = LoraSettings(r=4, alpha=4, dropout=0.0, target_modules=DIFFUSION_LORA_TARGETS)
    module = PreferenceModule(
        DiffusionBackbone(str(diffusion_builds["sd15"]), lora=lora, segments=2), DenseDPOLoss(beta=100.0),
        keep_host_memory=False,
    )  # fmt: skip
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()],
    ).fit(module, datamodule=load(train))  # fmt: skip
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the adapter starts at zero: policy = reference
    assert any(p.abs().sum() > 0 for n, p in module.policy.denoiser.named_parameters() if "lora_B" in n)


def test_the_densedpo_snippet_in_the_docs_builds_its_backbone_loss_and_datamodule():
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).parents[1] / "docs" / "diffusion.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "DenseDPOLoss" in b]
    snippet = yaml.safe_load(block)
    model = snippet["model"]["init_args"]
    assert DiffusionBackbone(**model["backbone"]["init_args"]).segments == 8
    assert DenseDPOLoss(**model["loss"]["init_args"]).beta == 500.0
    data = DiffusionPreferenceDataModule(**snippet["data"]["init_args"])
    assert (data.resolution, data.random_flip) == ([32, 256], False)
