"""DCPO (Dual Caption Preference Optimization): each image of a pair conditioned on its own caption.

Diffusion-DPO with the preferred image conditioned on ``caption`` and the dispreferred one on
``caption_rejected``, at one (t, ε) per pair. Checked on the tiny random-init pipelines of
:mod:`mmpo.tiny.diffusion`: with ``caption_rejected == caption`` it is plain Diffusion-DPO bit for bit;
with another caption only the loser's statistic moves, and the loser's rows are conditioned on
exactly the text encoders' embedding of its caption.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.diffusion import diffusion_config_cli

pytest.importorskip("diffusers")

from datamodules.core.records import BadSampleError  # noqa: E402
from datamodules.diffusion import DiffusionPreferenceDataModule, load_diffusion_records, write_diffusion_pairs  # noqa: E402
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS  # noqa: E402
from mmpo.losses import DPOLoss  # noqa: E402
from mmpo.module import PreferenceModule  # noqa: E402

RESOLUTION = 32


@pytest.fixture(scope="module")
def dual(tmp_path_factory) -> Path:
    """Pairs with caption_rejected (the loser's scene), and the same pairs with caption_rejected = caption."""
    root = tmp_path_factory.mktemp("dcpo-pairs")
    write_diffusion_pairs(root, n=8, seed=0, image_size=RESOLUTION, caption_rejected=True)
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    same = "".join(json.dumps(r | {"caption_rejected": r["caption"]}) + "\n" for r in rows)
    (root / "same.jsonl").write_text(same)
    return root


def datamodule(root: Path, file: str = "train.jsonl", dual_captions: bool = True, n: int = 4, **kwargs):
    return DiffusionPreferenceDataModule(
        train_file=str(root / file), data_root=str(root), resolution=RESOLUTION, center_crop=True,
        random_flip=False, loader={"batch_size": n, "shuffle": False}, dual_captions=dual_captions, **kwargs,
    )  # fmt: skip


def batch_of(root: Path, file: str = "train.jsonl", dual_captions: bool = True):
    """A new batch object holding the first 4 pairs of ``root / file``, in file order, and its datamodule."""
    dm = datamodule(root, file, dual_captions)
    dm.setup("fit")
    return next(iter(dm.train_dataloader())), dm


def dcpo_module(path: Path, beta: float = 250.0) -> PreferenceModule:
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=DIFFUSION_LORA_TARGETS)
    module = PreferenceModule(
        DiffusionBackbone(str(path), lora=lora), DPOLoss(beta=beta),
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.0), reference="adapter", keep_host_memory=False,
    )  # fmt: skip
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an adapter that acts, so that policy and reference differ
        for name, p in module.policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


# -- records and batches ------------------------------------------------------------------------------


def test_synthetic_second_captions_leave_the_records_otherwise_unchanged(dual, tmp_path):
    write_diffusion_pairs(tmp_path, n=8, seed=0, image_size=RESOLUTION)
    plain = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    with_second = [json.loads(line) for line in (dual / "train.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "caption_rejected"} for r in with_second] == plain
    assert all(r["caption_rejected"] != r["caption"] for r in with_second)


def test_the_rejected_caption_follows_the_dispreferred_image(dual):
    batch, dm = batch_of(dual)
    records = dm.datasets["train"].records
    assert {r.winner for r in records} == {0, 1}  # both orders occur
    raw = [json.loads(line) for line in (dual / "train.jsonl").read_text().splitlines()[:4]]
    assert batch.image_captions == [[r["caption"] for r in raw], [r["caption_rejected"] for r in raw]]
    assert batch.captions == [r["caption"] for r in raw] and batch.group_size == 2
    moved = batch.to("cpu")  # copies keep the captions
    assert moved.image_captions == batch.image_captions and moved.image_captions is not batch.image_captions


def test_without_dual_captions_the_second_caption_is_not_read(dual, caplog):
    with caplog.at_level(logging.WARNING):
        batch, _ = batch_of(dual, dual_captions=False)
    assert batch.image_captions is None
    assert "8 record(s) give caption_rejected, not used (dual_captions: false)" in caplog.text


BAD = {
    "missing": (None, "missing field(s) caption_rejected"),
    "empty": ("", "'caption_rejected' is empty"),
    "not a string": (3, "'caption_rejected' must be a string, got int"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_second_caption_names_file_and_line(dual, tmp_path, case):
    value, message = BAD[case]
    rows = [json.loads(line) for line in (dual / "train.jsonl").read_text().splitlines()[:3]]
    rows[1] = {k: v for k, v in (rows[1] | {"caption_rejected": value}).items() if v is not None}
    file = tmp_path / "bad.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadSampleError) as info:
        load_diffusion_records(file, data_root=dual, dual_captions=True)
    assert str(info.value).startswith(f"{file}:2: ") and message in str(info.value)
    kept, problems = load_diffusion_records(file, data_root=dual, on_bad_sample="skip", dual_captions=True)
    assert len(kept) == 2 and len(problems) == 1 and message in problems[0]
    assert len(load_diffusion_records(file, data_root=dual)[0]) == 3  # plain DPO does not read the field


# -- statistics and the loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_equal_captions_are_plain_diffusion_dpo_bit_for_bit(kind, diffusion_builds, dual):
    module = dcpo_module(diffusion_builds[kind])
    plain, _ = batch_of(dual, dual_captions=False)
    same, _ = batch_of(dual, "same.jsonl")
    assert same.image_captions == [plain.captions, plain.captions]
    with torch.no_grad():
        dpo, dpo_policy, dpo_reference = module.compute(plain)
        same.noise_draw = plain.noise_draw  # the same (t, ε)
        dcpo, policy, reference = module.compute(same)
    assert torch.equal(policy.logps, dpo_policy.logps) and torch.equal(reference.logps, dpo_reference.logps)
    assert torch.equal(dcpo.losses, dpo.losses)
    assert not torch.equal(policy.logps, reference.logps)  # the adapter acts: the losses are not all log 2


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_the_losers_caption_moves_only_the_losers_statistic(kind, diffusion_builds, dual, monkeypatch):
    module = dcpo_module(diffusion_builds[kind])
    backbone, model = module.backbone, module.policy
    plain, _ = batch_of(dual, dual_captions=False)
    batch, _ = batch_of(dual)
    seen = []
    denoise = backbone.denoise
    monkeypatch.setattr(backbone, "denoise", lambda m, x, t, text: seen.append(text) or denoise(m, x, t, text))
    with torch.no_grad():
        shared = backbone.statistics(model, plain)
        batch.noise_draw = plain.noise_draw
        own = backbone.statistics(model, batch)
        winners = backbone.encode_text(model, plain.captions)
        losers = backbone.encode_text(model, batch.image_captions[1])
    assert torch.equal(own.logps[:, 0], shared.logps[:, 0])  # the winner keeps its caption, its statistic
    assert (own.logps[:, 1] != shared.logps[:, 1]).all()  # the loser is denoised under its own caption
    text = seen[-1]  # the conditioning of the dual-caption pass, rows response-major (K·B)
    assert torch.equal(text.embeds, torch.cat([winners.embeds, losers.embeds]))
    if kind == "sdxl":  # the pooled embedding follows each image's caption too
        assert torch.equal(text.pooled, torch.cat([winners.pooled, losers.pooled]))


def test_dcpo_beta_is_half_the_released_runs_beta_and_a_step_lowers_the_loss(diffusion_builds, dual):
    module = dcpo_module(diffusion_builds["sd15"], beta=250.0)  # the released runs: beta_dpo 500
    batch, _ = batch_of(dual)
    out, policy, reference = module.compute(batch)
    # the DCPO code's loss: −log σ(−0.5·β·((e_θ^w − e_θ^l) − (e_ref^w − e_ref^l))), β = 500
    e_th, e_ref = -policy.logps.detach(), -reference.logps
    inside = -0.5 * 500.0 * ((e_th[:, 0] - e_th[:, 1]) - (e_ref[:, 0] - e_ref[:, 1]))
    torch.testing.assert_close(out.losses.detach(), -F.logsigmoid(inside))
    out.losses.mean().backward()
    with torch.no_grad():
        for p in (p for p in module.parameters() if p.requires_grad):
            p -= 1e-2 * p.grad / max(p.grad.norm().item(), 1e-12)
    after, _, _ = module.compute(batch)  # the same batch object: the same (t, ε)
    assert after.losses.mean().item() < out.losses.mean().item()


def test_cached_latents_with_dual_captions_give_the_statistics_from_pixels(diffusion_builds, dual, tmp_path):
    backbone = DiffusionBackbone(str(diffusion_builds["sd15"]))
    model = backbone.build().eval()
    plain, _ = batch_of(dual)
    dm = datamodule(dual, cache_dir=str(tmp_path / "cache"))
    dm.build_cache(**backbone.cache_encoders(model), show_progress=False)
    cached = next(iter(dm.train_dataloader()))
    # the cache holds the shared caption's embedding; with a caption per image the backbone encodes them
    assert cached.latents is not None and cached.text_embeds is None
    assert cached.image_captions == plain.image_captions
    with torch.no_grad():
        from_pixels = backbone.statistics(model, plain)
        cached.noise_draw = plain.noise_draw
        from_cache = backbone.statistics(model, cached)
    torch.testing.assert_close(from_cache.logps, from_pixels.logps, rtol=1e-5, atol=1e-6)


def test_dcpo_config_builds_and_reads_a_caption_per_image(diffusion_builds, dual, monkeypatch):
    cli = diffusion_config_cli("sd15_dcpo_lora.yaml", diffusion_builds["sd15"], dual / "train.jsonl", monkeypatch)
    module, dm = cli.model, cli.datamodule
    assert type(module.loss) is DPOLoss and module.loss.beta == 250.0 and dm.dual_captions
    module.configure_model()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    raw = {r["id"]: r for r in map(json.loads, (dual / "train.jsonl").read_text().splitlines())}
    assert batch.image_captions == [batch.captions, [raw[i]["caption_rejected"] for i in batch.ids]]
    out, _, _ = module.compute(batch)
    torch.testing.assert_close(out.losses.detach(), torch.full((8,), math.log(2)))  # the fresh adapter
