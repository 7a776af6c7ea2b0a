"""RankDPO data for diffusion: ranked lists of K images served as groups of K that share one (t, ε).

Records and batches are checked by hand; the statistics of a K-image group are checked against the
same images denoised one pair at a time at the same draw; ``LambdaRankLoss`` on them is checked
against Diffusion-DPO (K = 2) and against the DCG weights written out here (K = 4). Models are the tiny
random-init pipelines of :mod:`mmpo.tiny.diffusion`.
"""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.diffusion import diffusion_config_cli
from PIL import Image

pytest.importorskip("diffusers")

from datamodules.core.records import BadSampleError  # noqa: E402
from datamodules.diffusion import (  # noqa: E402
    DiffusionPreferenceBatch,
    DiffusionRankedDataModule,
    load_diffusion_ranked_records,
    write_diffusion_lists,
)
from datamodules.diffusion.batch import DiffusionPreferenceCollator  # noqa: E402
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS  # noqa: E402
from mmpo.losses import DPOLoss, LambdaRankLoss, PlackettLuceLoss, ResponseStats  # noqa: E402
from mmpo.module import PreferenceModule  # noqa: E402

RESOLUTION = 32


def ranked_module(root: Path, batch_size: int = 2, file: str = "train.jsonl", **kwargs) -> DiffusionRankedDataModule:
    return DiffusionRankedDataModule(
        train_file=str(root / file), resolution=RESOLUTION, center_crop=True, random_flip=False,
        loader={"batch_size": batch_size, "shuffle": False}, **kwargs,
    )  # fmt: skip


def first_batch(root: Path, batch_size: int = 2, **kwargs) -> DiffusionPreferenceBatch:
    dm = ranked_module(root, batch_size, **kwargs)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.fixture(scope="module")
def lists(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusion-lists")
    write_diffusion_lists(root, n=4, k=4, seed=0, image_size=RESOLUTION)
    return root


@pytest.fixture(scope="module")
def lists_of_two(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusion-lists-2")
    write_diffusion_lists(root, n=4, k=2, seed=1, image_size=RESOLUTION)
    return root


@pytest.fixture()
def images(tmp_path) -> Path:
    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (8, 8), color).save(tmp_path / f"{i}.png")
    return tmp_path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- records ----------------------------------------------------------------------------------------


def test_scores_and_rankings_order_the_images_best_first(images):
    common = {"caption": "a red circle .", "images": ["0.png", "1.png", "2.png"]}
    rows = [
        {"id": "s", **common, "scores": [0.2, 0.9, 0.5]},
        {"id": "r", **common, "ranking": [2, 0, 1]},
        {**common, "scores": [3, 3, 1], "ranking": [1, 0, 2]},
    ]
    file = write_jsonl(images / "data.jsonl", rows)
    (by_scores, by_ranking, both), problems = load_diffusion_ranked_records(file)
    assert problems == []
    assert by_scores.order == [1, 2, 0] and by_scores.scores == (0.9, 0.5, 0.2)
    assert by_scores.images == tuple(str((images / f"{i}.png").resolve()) for i in range(3))
    # a ranking alone: ψ = K − 1 − position, the labels LambdaRankLoss derives from the order
    assert by_ranking.order == [2, 0, 1] and by_ranking.scores == (2.0, 1.0, 0.0)
    # both: the scores are kept (the tie stays a tie, in the data's order), the ranking agrees with them
    assert both.order == [0, 1, 2] and both.scores == (3.0, 3.0, 1.0) and both.id == f"{file}:3"
    assert by_scores.label == 1.0 and by_scores.image_captions is None


def test_lists_of_equal_scores_are_ties_dropped_by_default(images):
    rows = [
        {"id": "tie", "caption": "a red circle .", "images": ["0.png", "1.png"], "scores": [1, 1]},
        {"id": "ok", "caption": "a red circle .", "images": ["0.png", "1.png"], "scores": [0, 1]},
    ]
    file = write_jsonl(images / "data.jsonl", rows)
    assert [r.id for r in load_diffusion_ranked_records(file)[0]] == ["ok"]
    assert [r.id for r in load_diffusion_ranked_records(file, drop_ties=False)[0]] == ["tie", "ok"]


BAD = {
    "one image": ({"images": ["0.png"], "scores": [1.0]}, "'images' needs at least 2 images to rank, got 1"),
    "scores of the wrong length": ({"scores": [1.0, 2.0]}, "'scores' has 2 entries for 3 images"),
    "missing image file": ({"images": ["0.png", "gone.png", "2.png"]}, "media file not found"),
    "empty caption": ({"caption": "  "}, "'caption' is empty"),
    "no caption": ({"caption": None}, "missing field(s) caption"),
    "no scores": ({"scores": None}, "missing field(s) scores (or ranking)"),
    "NaN score": ({"scores": [1.0, float("nan"), 0.0]}, "'scores' must be finite numbers"),
    "ranking not a permutation": ({"scores": None, "ranking": [0, 0, 1]}, "permutation of 0..2"),
    "ranking against the scores": ({"ranking": [2, 1, 0]}, "'ranking' puts image 2 (score 0) above image 1"),
    "images not a list": ({"images": "0.png"}, "'images' must be a list"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_record_names_file_and_line(images, case):
    change, message = BAD[case]
    good = {"id": "g", "caption": "a red circle .", "images": ["0.png", "1.png", "2.png"], "scores": [2.0, 1.0, 0.0]}
    bad = {k: v for k, v in (good | {"id": "b"} | change).items() if v is not None}
    file = images / "data.jsonl"
    file.write_text(json.dumps(good) + "\n" + json.dumps(bad, allow_nan=True) + "\n")
    with pytest.raises(BadSampleError) as info:
        load_diffusion_ranked_records(file)
    assert str(info.value).startswith(f"{file}:2: ") and message in str(info.value)
    kept, problems = load_diffusion_ranked_records(file, on_bad_sample="skip")
    assert [r.id for r in kept] == ["g"] and len(problems) == 1 and message in problems[0]


# -- batches ----------------------------------------------------------------------------------------


def test_batch_holds_k_rows_per_group_best_first(lists):
    batch = first_batch(lists, batch_size=2)
    assert batch.num_groups == 2 and batch.group_size == 4
    assert batch.pixel_values.shape == (8, 3, RESOLUTION, RESOLUTION)
    records = [json.loads(line) for line in (lists / "train.jsonl").read_text().splitlines()[:2]]
    for b, raw in enumerate(records):
        order = sorted(range(4), key=lambda i: -raw["scores"][i])
        assert batch.scores[b].tolist() == [raw["scores"][i] for i in order] == [3.0, 2.0, 1.0, 0.0]
        for k, i in enumerate(order):  # row k·B + b is image k (best first) of group b
            pixels = torch.from_numpy(np.array(Image.open(lists / raw["images"][i]))).float()
            expected = pixels.permute(2, 0, 1) / 127.5 - 1.0
            torch.testing.assert_close(batch.pixel_values[k * 2 + b], expected)
    side = batch.side_info()
    assert torch.equal(side["scores"], batch.scores) and side["soft_labels"].tolist() == [1.0, 1.0]


def test_groups_of_different_sizes_are_refused_with_the_records_named(lists, lists_of_two):
    big, small = ranked_module(lists), ranked_module(lists_of_two)
    big.setup("fit")
    small.setup("fit")
    samples = [big.datasets["train"][0], small.datasets["train"][0]]
    message = r"different sizes \(images per record: 'train-list-000000': 4, 'train-list-000000': 2\)"
    with pytest.raises(ValueError, match=message):
        DiffusionPreferenceCollator()(samples)


def test_dual_captions_are_refused_for_lists(lists):
    with pytest.raises(ValueError, match="not supported for ranked lists"):
        ranked_module(lists, dual_captions=True).setup("fit")


# -- statistics and losses ------------------------------------------------------------------------------


def pair_of(batch: DiffusionPreferenceBatch, i: int, j: int) -> DiffusionPreferenceBatch:
    """Images i and j (list positions) of every group, as a pair batch carrying the list's draw."""
    b = batch.num_groups
    rows = [i * b + g for g in range(b)] + [j * b + g for g in range(b)]
    pair = DiffusionPreferenceBatch(
        pixel_values=batch.pixel_values[rows], captions=list(batch.captions), label=torch.ones(b), ids=list(batch.ids)
    )
    pair.noise_draw = batch.noise_draw
    return pair


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_list_statistics_equal_the_pairs_denoised_at_the_same_draw(kind, diffusion_builds, lists):
    backbone = DiffusionBackbone(str(diffusion_builds[kind]))
    model = backbone.build().train()
    batch = first_batch(lists, batch_size=2)
    with torch.no_grad():
        stats = backbone.statistics(model, batch)  # draws (t, ε) per group and keeps it on the batch
        assert stats.logps.shape == (2, 4) and batch.noise_draw.num_groups == 2
        for i, j in combinations(range(4), 2):
            pair = backbone.statistics(model, pair_of(batch, i, j))
            torch.testing.assert_close(pair.logps, stats.logps[:, [i, j]], rtol=1e-5, atol=1e-6)
    # the same images at another draw give other numbers: the comparison above can fail
    with torch.no_grad():
        other = backbone.statistics(model, first_batch(lists, batch_size=2))
    assert not torch.allclose(other.logps, stats.logps)


def preference_module(path: Path, loss, lr: float = 0.0) -> PreferenceModule:
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=DIFFUSION_LORA_TARGETS)
    module = PreferenceModule(
        DiffusionBackbone(str(path), lora=lora),
        loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        reference="adapter",
        keep_host_memory=False,
    )
    module.configure_model()
    return module


def perturb_adapter(module: PreferenceModule, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lambda_rank_on_lists_of_two_is_a_scaled_diffusion_dpo(diffusion_builds, lists_of_two):
    beta = 2500.0
    module = preference_module(diffusion_builds["sd15"], LambdaRankLoss(beta=beta))
    perturb_adapter(module)
    batch = first_batch(lists_of_two, batch_size=4)
    assert batch.group_size == 2 and batch.scores.tolist() == [[1.0, 0.0]] * 4  # ψ = (1, 0): G = (1, 0)
    ranked, policy, reference = module.compute(batch)
    module.loss = DPOLoss(beta=beta)
    dpo, policy_again, _ = module.compute(batch)  # the same batch object: the same (t, ε)
    torch.testing.assert_close(policy_again.logps, policy.logps, rtol=0, atol=0)
    # one pair, positions 1 and 2: Δ = |G_0 − G_1| · |1/log₂2 − 1/log₂3| = 1 − 1/log₂3
    torch.testing.assert_close(ranked.losses, (1 - 1 / math.log2(3)) * dpo.losses, rtol=1e-5, atol=0)
    assert not torch.allclose(dpo.losses, torch.full_like(dpo.losses, math.log(2)))  # the adapter acts
    # the official Diffusion-DPO form on the same errors (β_official = 2β): the scaled loss is that, too
    e = -torch.stack([policy.logps, reference.logps])  # (2, B, K) errors
    inside = -0.5 * (2 * beta) * ((e[0, :, 0] - e[0, :, 1]) - (e[1, :, 0] - e[1, :, 1]))
    torch.testing.assert_close(ranked.losses, (1 - 1 / math.log2(3)) * -F.logsigmoid(inside))


def dcg_loss_by_hand(r: torch.Tensor, scores: torch.Tensor, beta: float) -> torch.Tensor:
    """RankDPO for one group: Σ_{ψ_i > ψ_j} |G_i − G_j|·|1/log₂(1+τ_i) − 1/log₂(1+τ_j)|·(−log σ(β(r_i − r_j))),
    τ the rank of β·r among the group's current rewards (LiPO-λ positions), written with loops."""
    k = len(r)
    rank = sorted(range(k), key=lambda i: (-float(r[i]), i))
    tau = {i: p + 1 for p, i in enumerate(rank)}
    total = torch.zeros((), dtype=r.dtype)
    for i in range(k):
        for j in range(k):
            if scores[i] > scores[j]:
                gain = abs(2 ** float(scores[i]) - 2 ** float(scores[j]))
                discount = abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
                total = total + gain * discount * -F.logsigmoid(beta * (r[i] - r[j]))
    return total


def test_rankdpo_on_lists_of_four_by_hand_and_a_step_lowers_it(diffusion_builds, lists):
    beta = 2500.0
    module = preference_module(diffusion_builds["sd15"], LambdaRankLoss(beta=beta))
    batch = first_batch(lists, batch_size=2)
    out, policy, reference = module.compute(batch)
    # the fresh adapter is its reference: every r = 0, positions follow the list, each pair adds Δ·log 2
    fresh = torch.stack([dcg_loss_by_hand(torch.zeros(4), batch.scores[b], beta) for b in range(2)])
    torch.testing.assert_close(out.losses.detach(), fresh.float())
    assert fresh[0].item() == pytest.approx(math.log(2) * 9.393488, rel=1e-6)  # Σ Δ_ij for ψ = (3, 2, 1, 0)
    perturb_adapter(module)
    out, policy, reference = module.compute(batch)
    r = (policy.logps - reference.logps).detach().double()
    by_hand = torch.stack([dcg_loss_by_hand(r[b], batch.scores[b].double(), beta) for b in range(2)])
    torch.testing.assert_close(out.losses.detach().double(), by_hand, rtol=1e-5, atol=1e-6)
    out.losses.mean().backward()
    with torch.no_grad():
        for p in (p for p in module.parameters() if p.requires_grad):
            p -= 1e-3 * p.grad / max(p.grad.norm().item(), 1e-12)
    after, _, _ = module.compute(batch)  # the same batch object: the same (t, ε)
    assert after.losses.mean().item() < out.losses.mean().item()
    # Plackett–Luce reads the same (B, K) statistics unchanged
    module.loss = PlackettLuceLoss(beta=beta)
    pl, _, _ = module.compute(batch)
    assert pl.losses.shape == (2,) and torch.isfinite(pl.losses).all()


def test_lambda_rank_stays_finite_at_extreme_diffusion_margins():
    ones, scores = torch.ones(2, 4, dtype=torch.float64), torch.tensor([[3.0, 2, 1, 0]] * 2, dtype=torch.float64)
    r = torch.tensor([[1e4, -1e4, 1e4, -1e4], [1e4, 1e3, 0.0, -1e4]], dtype=torch.float64)  # log-ratios ±1e4
    policy = ResponseStats(logps=r, tokens=ones).with_side(scores=scores)
    out = LambdaRankLoss(beta=2500.0)(policy, ResponseStats(logps=torch.zeros_like(r), tokens=ones))
    assert torch.isfinite(out.losses).all()
    by_hand = torch.stack([dcg_loss_by_hand(r[b], scores[b], 2500.0) for b in range(2)])
    torch.testing.assert_close(out.losses, by_hand, rtol=1e-12, atol=0)
    assert out.losses[0] > 1e7 and out.losses[1] == 0  # a list ranked right by margins of 1e4 costs nothing


def test_cached_lists_give_the_statistics_computed_from_pixels(diffusion_builds, lists, tmp_path):
    backbone = DiffusionBackbone(str(diffusion_builds["sd15"]))
    model = backbone.build().eval()
    dm = ranked_module(lists, cache_dir=str(tmp_path / "cache"))
    stats = dm.build_cache(**backbone.cache_encoders(model), show_progress=False)
    assert stats["train"].written == 4
    cached = next(iter(dm.train_dataloader()))
    plain = first_batch(lists, batch_size=2)
    assert cached.latents.shape[0] == 8 and cached.pixel_values is None and cached.group_size == 4
    with torch.no_grad():
        from_pixels = backbone.statistics(model, plain)
        cached.noise_draw = plain.noise_draw
        from_cache = backbone.statistics(model, cached)
    torch.testing.assert_close(from_cache.logps, from_pixels.logps, rtol=1e-5, atol=1e-6)


def test_rankdpo_config_builds_and_trains_on_ranked_lists(diffusion_builds, lists, monkeypatch):
    cli = diffusion_config_cli("sd15_rankdpo_lora.yaml", diffusion_builds["sd15"], lists / "train.jsonl", monkeypatch)
    module, dm = cli.model, cli.datamodule
    assert type(dm) is DiffusionRankedDataModule and type(module.loss) is LambdaRankLoss
    assert (module.loss.beta, module.loss.positions, module.loss.normalize) == (2500.0, "policy", False)
    module.configure_model()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))  # 4 lists of 4 images, shuffled, cropped and flipped at random
    assert batch.num_groups == 4 and batch.group_size == 4
    out, policy, _ = module.compute(batch)
    by_hand = torch.stack([dcg_loss_by_hand(torch.zeros(4), batch.scores[b], 2500.0) for b in range(4)])
    torch.testing.assert_close(out.losses.detach(), by_hand.float())  # the fresh adapter: every r = 0


def test_tlpo_dimensions_are_refused_for_lists(lists):
    with pytest.raises(ValueError, match="dimensions .* not supported for ranked lists"):
        ranked_module(lists, dimensions=["lip_sync"]).setup("fit")
