"""D3PO: the clipped per-step loss against the official formula, the DDIM step's Gaussian against diffusers'
DDIMScheduler, the trajectory sampler, trajectory-pair data, and a LoRA fit on a tiny SD 1.5."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

pytest.importorskip("diffusers")

from datamodules.core.records import BadSampleError  # noqa: E402
from datamodules.diffusion.trajectories import (  # noqa: E402
    DiffusionTrajectoryDataModule,
    load_trajectory,
    save_trajectory,
    write_trajectory_pairs,
)
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS  # noqa: E402
from mmpo.backbones.diffusion_trajectory import (  # noqa: E402
    ddim_step_distribution,
    sample_trajectory_pairs,
    step_log_density,
)
from mmpo.losses import D3POLoss, ResponseStats  # noqa: E402
from mmpo.module import PreferenceModule  # noqa: E402

CAPTIONS = ["a red circle .", "a blue square .", "a green triangle .", "a red square ."]
STEPS = 4


@pytest.fixture(scope="module")
def trajectories(diffusion_builds, tmp_path_factory):
    """Four trajectory pairs sampled from the tiny SD 1.5 (4 steps, eta 1, guidance 3); scores prefer trajectory 1
    of the first two records and trajectory 0 of the others."""
    backbone = DiffusionBackbone(str(diffusion_builds["sd15"]))
    model = backbone.build()
    sampled = sample_trajectory_pairs(backbone, model, CAPTIONS, [0, 1, 2, 3], STEPS, eta=1.0, guidance_scale=3.0)
    root = tmp_path_factory.mktemp("d3po")
    scores = [(0.1, 0.9), (0.2, 0.7), (0.8, 0.3), (0.6, 0.5)]
    path = write_trajectory_pairs(root, CAPTIONS, sampled, scores, eta=1.0, guidance_scale=3.0)
    return {"path": path, "sampled": sampled, "backbone": backbone, "model": model}


def stats(logps: torch.Tensor) -> ResponseStats:
    return ResponseStats(logps=logps, tokens=torch.ones_like(logps))


def test_d3po_loss_is_the_official_scripts_formula():
    torch.manual_seed(0)
    policy, reference = torch.randn(64, 2) * 0.2, torch.randn(64, 2) * 0.2
    policy[:4] = torch.tensor([[50.0, -50.0], [-50.0, 50.0], [0.05, -0.05], [1e-3, 2e-3]])  # far outside and inside
    reference[:4] = 0.0
    policy.requires_grad_(True)
    beta, eps = 0.1, 0.1
    out = D3POLoss(beta=beta, clip=eps)(stats(policy), stats(reference))
    # the official train_d3po.py: ratios clipped to [1 - eps, 1 + eps], human_prefer (1, -1) when trajectory 0 wins
    with torch.no_grad():
        ratio = torch.clamp(torch.exp(policy - reference), 1 - eps, 1 + eps)
        official = -torch.log(torch.sigmoid(beta * torch.log(ratio[:, 0]) * 1 + beta * torch.log(ratio[:, 1]) * -1))
    torch.testing.assert_close(out.losses.detach(), official)
    out.losses.sum().backward()
    delta = (policy - reference).detach()
    clipped = (delta > math.log1p(eps)) | (delta < math.log(1 - eps))
    assert clipped[0].all() and not clipped[2].any()
    assert torch.all(policy.grad[clipped] == 0) and torch.all(policy.grad[~clipped] != 0)
    torch.testing.assert_close(out.chosen_rewards, beta * torch.log(ratio[:, 0]))
    with pytest.raises(ValueError, match="clip must be > 0"):
        D3POLoss(clip=0.0)
    with pytest.raises(ValueError, match="clip"):
        D3POLoss(clip=1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_step_distribution_is_ddim_at_eta(prediction_type):
    from diffusers import DDIMScheduler, DDPMScheduler

    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    ddpm = DDPMScheduler(**schedule, prediction_type=prediction_type)
    ddim = DDIMScheduler(**schedule, prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)
    ddim.set_timesteps(20)
    torch.manual_seed(0)
    sample, output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for t in ddim.timesteps[[0, 7, 18]].tolist():  # every prev timestep >= 0
        rows = torch.full((3,), t)
        mean, std = ddim_step_distribution(ddpm.alphas_cumprod, prediction_type, output, rows, rows - 50, sample, 0.7)
        zero = ddim.step(output, t, sample, eta=0.7, variance_noise=torch.zeros_like(sample)).prev_sample
        one = ddim.step(output, t, sample, eta=0.7, variance_noise=torch.ones_like(sample)).prev_sample
        torch.testing.assert_close(mean, zero, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std.expand_as(mean), one - zero, rtol=1e-4, atol=1e-6)
    x = torch.randn(3, 4, 8, 8)
    by_hand = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(step_log_density(x, mean, std), by_hand)


def test_pairs_start_from_one_noise_and_each_step_is_the_samplers_draw(trajectories):
    backbone, model, sampled = trajectories["backbone"], trajectories["model"], trajectories["sampled"]
    latents = sampled["latents"]  # (4, 2, S + 1, 4, 8, 8)
    assert latents.shape == (4, 2, STEPS + 1, 4, 8, 8)
    assert torch.equal(latents[:, 0, 0], latents[:, 1, 0]) and not torch.equal(latents[:, 0, 1], latents[:, 1, 1])
    assert sampled["timesteps"].tolist() == [751, 501, 251, 1] and sampled["prev_timesteps"].tolist() == [
        501,
        251,
        1,
        0,
    ]
    alone = sample_trajectory_pairs(backbone, model, CAPTIONS[2:3], [2], STEPS, eta=1.0, guidance_scale=3.0)
    torch.testing.assert_close(alone["latents"][0], latents[2], rtol=1e-4, atol=1e-5)  # a pair needs only its seed
    # every recorded step is the guided DDIM mean plus the trajectory's own generator's noise times the step's std
    generator = torch.Generator().manual_seed(3 * 2 + 1)  # caption 3, trajectory 1
    text = backbone.encode_text(model, [CAPTIONS[3], ""])
    with torch.no_grad():
        for j, (t, prev) in enumerate(zip(sampled["timesteps"], sampled["prev_timesteps"], strict=True)):
            x = latents[3, 1, j : j + 1]
            cond, uncond = (model.denoiser(x, t, encoder_hidden_states=text.embeds[i : i + 1]).sample for i in (0, 1))
            guided = uncond + 3.0 * (cond - uncond)
            mean, std = ddim_step_distribution(
                model.schedule.scheduler.alphas_cumprod, "epsilon", guided, t.view(1), prev.view(1), x, 1.0
            )
            noise = torch.randn((4, 8, 8), generator=generator)
            torch.testing.assert_close(latents[3, 1, j + 1], (mean + std * noise)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eta must be > 0"):
        sample_trajectory_pairs(backbone, model, CAPTIONS[:1], [0], STEPS, eta=0.0)


def datamodule(path, **kwargs) -> DiffusionTrajectoryDataModule:
    dm = DiffusionTrajectoryDataModule(train_file=str(path), loader={"batch_size": 4, "shuffle": False}, **kwargs)
    dm.setup("fit")
    return dm


def test_items_are_the_steps_of_each_pair_preferred_first(trajectories):
    latents = trajectories["sampled"]["latents"]
    dm = datamodule(trajectories["path"])
    dataset = dm.datasets["train"]
    assert len(dataset) == 4 * STEPS
    batch = next(iter(dm.train_dataloader()))  # record 0's four steps, in its epoch-0 order
    steps = [int(i.split("@")[1]) for i in batch.ids]
    assert sorted(steps) == [0, 1, 2, 3] and all(i.startswith("train-000000@") for i in batch.ids)
    for b, j in enumerate(steps):  # scores prefer trajectory 1 of record 0: it comes first
        assert torch.equal(batch.latents[b], latents[0, 1, j]) and torch.equal(batch.latents[4 + b], latents[0, 0, j])
        assert torch.equal(batch.trajectory.next_latents[b], latents[0, 1, j + 1])
    assert batch.trajectory.timesteps.tolist() == [[751, 501, 251, 1][j] for j in steps]
    assert (batch.trajectory.eta, batch.trajectory.guidance_scale) == (1.0, 3.0) and batch.group_size == 2
    orders = [[dataset.step_of(i, epoch)[1] for i in range(STEPS)] for epoch in range(6)]
    assert len({tuple(o) for o in orders}) > 1 and orders[0] == [dataset.step_of(i, 0)[1] for i in range(STEPS)]
    assert len(datamodule(trajectories["path"], steps_per_record=2).datasets["train"]) == 8
    with pytest.raises(ValueError, match=r"steps_per_record must be in \[1, 4\]"):
        datamodule(trajectories["path"], steps_per_record=5)
    with pytest.raises(ValueError, match=r"\['cache_dir'\] do not apply"):
        DiffusionTrajectoryDataModule(train_file=str(trajectories["path"]), cache_dir="x")


def test_bad_trajectories_name_the_record_and_the_file(trajectories, tmp_path):
    import shutil

    root = shutil.copytree(trajectories["path"].parent, tmp_path / "bad")
    records = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    (root / "trajectories" / "broken.safetensors").write_bytes(b"not a safetensors file")
    first = load_trajectory(str(root / records[0]["trajectory_0"]), "x")
    save_trajectory(
        root / "three_steps.safetensors", first["latents"][:4], first["timesteps"][:3], first["prev_timesteps"][:3],
        1.0, 3.0,
    )  # fmt: skip
    save_trajectory(
        root / "no_noise.safetensors", first["latents"], first["timesteps"], first["prev_timesteps"], 0.0, 3.0
    )
    records[1]["trajectory_1"] = "trajectories/broken.safetensors"
    records[2]["trajectory_0"] = "three_steps.safetensors"
    records[3]["trajectory_0"] = "no_noise.safetensors"
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dm = datamodule(root / "train.jsonl")
    dataset = dm.datasets["train"]
    for index, message in (
        (STEPS, r"train\.jsonl:2: cannot read trajectory .*broken\.safetensors"),
        (2 * STEPS, r"train\.jsonl:3: trajectory .*three_steps\.safetensors has 3 steps, the dataset's 4"),
        (3 * STEPS, r"train\.jsonl:4: trajectory .*no_noise\.safetensors was sampled with eta = 0\.0"),
    ):
        with pytest.raises(BadSampleError, match=message):
            dataset[index]
    # one step read by slice: the same two latents as from the whole file; a step past the end is refused
    path = str(root / records[0]["trajectory_0"])
    step = load_trajectory(path, "x", step=2)
    assert torch.equal(step["latents"], first["latents"][2:4]) and torch.equal(step["timesteps"], first["timesteps"])
    with pytest.raises(BadSampleError, match=r"x: trajectory .* has 4 steps; step 4 asked for"):
        load_trajectory(path, "x", step=STEPS)
    skipping = datamodule(root / "train.jsonl", on_bad_sample="skip")
    batches = list(skipping.train_dataloader())
    assert sum(b.skipped for b in batches) == 3 * STEPS and sum(len(b.ids) for b in batches) == STEPS
    records[0]["trajectory_1"] = "missing.safetensors"
    (root / "train.jsonl").write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(BadSampleError, match=r"train\.jsonl:1: .*missing\.safetensors"):
        datamodule(root / "train.jsonl")
    with pytest.raises(BadSampleError, match=re.escape("missing field(s) trajectory_1")):
        (root / "train.jsonl").write_text(json.dumps({"caption": "a", "trajectory_0": "x", "label_0": 1}) + "\n")
        datamodule(root / "train.jsonl")


def test_d3po_trains_a_lora_from_recorded_steps(diffusion_builds, trajectories):
    lora = LoraSettings(r=4, alpha=4, dropout=0.0, target_modules=DIFFUSION_LORA_TARGETS)
    module = PreferenceModule(
        DiffusionBackbone(str(diffusion_builds["sd15"]), lora=lora), D3POLoss(beta=1.0, clip=0.1),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), reference="adapter", keep_host_memory=False,
    )  # fmt: skip
    module.configure_model()
    batch = next(iter(datamodule(trajectories["path"]).train_dataloader()))
    out, policy, reference = module.compute(batch)
    torch.testing.assert_close(policy.logps.detach(), reference.logps)  # a fresh adapter is its reference
    assert out.losses.mean().item() == pytest.approx(math.log(2), abs=1e-6)
    # the statistic is the recorded step's log-density under the guided denoiser, computed here by hand
    model, backbone = trajectories["model"], trajectories["backbone"]
    with torch.no_grad():
        x, step = batch.latents, batch.trajectory
        text = backbone.encode_text(model, batch.captions * 2 + [""] * 8).embeds
        t = step.timesteps.repeat(2)
        pred = model.denoiser(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=text).sample
        cond, uncond = pred.chunk(2)
        mean, std = ddim_step_distribution(
            model.schedule.scheduler.alphas_cumprod, "epsilon", uncond + 3.0 * (cond - uncond), t,
            step.prev_timesteps.repeat(2), x, 1.0,
        )  # fmt: skip
        by_hand = step_log_density(step.next_latents, mean, std).view(2, 4).T
    torch.testing.assert_close(reference.logps, by_hand, rtol=1e-5, atol=1e-5)
    out.losses.mean().backward()
    params = [p for p in module.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= 1e-3 * p.grad / max(p.grad.norm().item(), 1e-12)
    after, _, _ = module.compute(batch)
    assert after.losses.mean().item() < math.log(2)


def test_the_docs_example_samples_scores_and_writes_pairs_that_train(diffusion_builds, tmp_path):
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "diffusion.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "sample_trajectory_pairs" in b]
    block = block.replace("num_inference_steps=20", "num_inference_steps=3")  # the tiny model, few steps
    scope = {"checkpoint": str(diffusion_builds["sd15"]), "out_dir": tmp_path}
    exec(compile(block, "docs/diffusion.md", "exec"), scope)
    records = [json.loads(line) for line in scope["train_file"].read_text().splitlines()]
    assert len(records) == 2
    assert scope["images"].shape == (4, 3, 32, 32)
    # the untrained tiny model draws no shapes: every reward is 0, so every pair is a tie, dropped by default
    assert all(r["scores"] == [0.0, 0.0] for r in records)
    with pytest.raises(ValueError, match="no usable trajectory pairs .0 skipped, ties dropped: True"):
        DiffusionTrajectoryDataModule(train_file=str(scope["train_file"])).setup("fit")
    dm = DiffusionTrajectoryDataModule(train_file=str(scope["train_file"]), drop_ties=False, loader={"batch_size": 3})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.trajectory.guidance_scale == 5.0 and batch.latents.shape == (6, 4, 8, 8)
