"""TLPO end to end on a tiny SD 1.5: stage 1 trains two experts on their dimensions' pairs, stage 2 a gate.

Both stages run through ``PreferenceModule`` and the Lightning trainer on shapes-world pairs tagged with
a dimension; the configs in configs/tlpo/ are parsed and built with loading pointed at the tiny build,
and their header commands run for one step.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")

import lightning as L  # noqa: E402
from helpers.diffusion import tiny_run_args, write_video_pairs  # noqa: E402

from datamodules.core.records import BadSampleError  # noqa: E402
from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs  # noqa: E402
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion_experts import ExpertDiffusionBackbone  # noqa: E402
from mmpo.backbones.diffusion_model import load_diffusion_model  # noqa: E402
from mmpo.backbones.experts import GateSettings  # noqa: E402
from mmpo.cli import MMPOCLI, main  # noqa: E402
from mmpo.losses import DPOLoss  # noqa: E402
from mmpo.module import PreferenceModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "tlpo").glob("*.yaml"))
DIMENSIONS = ["motion_naturalness", "lip_sync", "visual_quality"]  # the configs' dimensions
EXPERTS = DIMENSIONS[1:]  # stage 1 trains two of them here (time); the configs' gate is pointed at these
EXPERTS_ARG = "model.init_args.backbone.init_args.experts"
TINY_FOR = {  # the real checkpoint of each config -> the tiny build standing in for it
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan",
}
# the SD3 experts' targets named in configs/tlpo/sd3_medium_gate.yaml
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
SD3_TARGETS += ["ff.net.0.proj", "ff.net.2"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
# the Wan experts' targets named in configs/diffusion/wan21_t2v_1_3b_dpo_lora.yaml (self/cross attention, FFN)
WAN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
EXPERT_TARGETS = {"sd15": TARGETS, "sd3": SD3_TARGETS, "wan": WAN_TARGETS}
WAN_FRAMES = 9  # the Wan config's clips on the tiny build (4n + 1 frames)


@pytest.fixture(scope="module")
def tagged_pairs(tmp_path_factory) -> Path:
    """12 shapes-world pairs, record i judged on dimension i mod 3."""
    root = tmp_path_factory.mktemp("tlpo-pairs")
    path = write_diffusion_pairs(root, n=12, seed=0, image_size=32)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i, rec in enumerate(records):
        rec["dimension"] = DIMENSIONS[i % 3]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def datamodule(path: Path, dimensions: list[str] | None) -> DiffusionPreferenceDataModule:
    return DiffusionPreferenceDataModule(
        train_file=str(path), resolution=32, dimensions=dimensions, loader={"batch_size": 2, "shuffle": False}
    )


def fit(backbone: ExpertDiffusionBackbone, data: DiffusionPreferenceDataModule, lr: float, save_dir: Path | None):
    """Two training steps; returns the module and its losses."""
    module = PreferenceModule(
        backbone, DPOLoss(beta=2500.0), optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        reference="adapter", save_dir=None if save_dir is None else str(save_dir), keep_host_memory=False,
    )  # fmt: skip
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
    )  # fmt: skip
    module.configure_model()
    trainer.fit(module, data)
    return module, losses


def named(module: PreferenceModule, part: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.denoiser.named_parameters() if part in n}


@pytest.fixture(scope="module")
def experts_dir(diffusion_builds, tagged_pairs, tmp_path_factory) -> Path:
    """Stage 1: each dimension's expert, three steps on its own pairs, saved by name."""
    out = tmp_path_factory.mktemp("tlpo-experts")
    for dim in EXPERTS:
        lora = LoraSettings(r=2, alpha=2, dropout=0.0, target_modules=TARGETS)
        backbone = ExpertDiffusionBackbone(str(diffusion_builds["sd15"]), stage="expert", expert=dim, lora=lora)
        module, losses = fit(backbone, datamodule(tagged_pairs, [dim]), 1e-3, out / dim)
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # a fresh expert is its reference
        assert all(p.abs().sum() > 0 for p in named(module, "lora_B").values())  # B left zero: the expert acts
    return out


@pytest.fixture(scope="module")
def tagged_videos(tmp_path_factory) -> Path:
    """8 video-world pairs of mp4 clips, record i judged on dimension i mod 3 (the Wan config's data)."""
    return write_video_pairs(tmp_path_factory.mktemp("tlpo-videos"), n=8, frames=WAN_FRAMES, dimensions=DIMENSIONS)


def random_experts(diffusion_builds, kind: str, out: Path) -> Path:
    """Untrained experts (random B) on a tiny build, for its config: each saved by name, as stage 1 does."""
    for i, dim in enumerate(EXPERTS):
        lora = LoraSettings(r=2, alpha=2, dropout=0.0, target_modules=EXPERT_TARGETS[kind])
        backbone = ExpertDiffusionBackbone(str(diffusion_builds[kind]), stage="expert", expert=dim, lora=lora)
        model = backbone.build()
        with torch.no_grad():
            for n, p in model.denoiser.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
        backbone.save(model, out / dim)
    return out


@pytest.fixture(scope="module")
def sd3_experts_dir(diffusion_builds, tmp_path_factory) -> Path:
    return random_experts(diffusion_builds, "sd3", tmp_path_factory.mktemp("tlpo-sd3-experts"))


@pytest.fixture(scope="module")
def wan_experts_dir(diffusion_builds, tmp_path_factory) -> Path:
    return random_experts(diffusion_builds, "wan", tmp_path_factory.mktemp("tlpo-wan-experts"))


def tiny_and_experts(spec: dict, diffusion_builds, request) -> tuple[Path, Path]:
    """The tiny build standing in for a config's checkpoint, and the experts made on it."""
    kind = TINY_FOR[spec["model"]["init_args"]["backbone"]["init_args"]["model_name_or_path"]]
    experts = request.getfixturevalue("experts_dir" if kind == "sd15" else f"{kind}_experts_dir")
    return diffusion_builds[kind], experts


def config_data(spec: dict, request) -> tuple[Path, list[str]]:
    """A config's training file and the overrides it needs on the tiny build: tagged image pairs, or for a
    video config tagged mp4 pairs at the tiny clip length."""
    if spec["data"]["init_args"].get("frames"):
        return request.getfixturevalue("tagged_videos"), [f"--data.init_args.frames={WAN_FRAMES}"]
    return request.getfixturevalue("tagged_pairs"), []


def test_stage_one_saves_one_peft_expert_per_dimension(experts_dir):
    for dim in EXPERTS:
        config = json.loads((experts_dir / dim / "adapter_config.json").read_text())
        assert config["r"] == 2 and set(config["target_modules"]) == set(TARGETS)
        assert (experts_dir / dim / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def stage_two(diffusion_builds, experts_dir, tagged_pairs) -> dict:
    """Stage 2: the gate over the frozen experts, two steps on every dimension's pairs, saved beside them."""
    sd15 = str(diffusion_builds["sd15"])
    backbone = ExpertDiffusionBackbone(sd15, stage="gate", experts_dir=str(experts_dir), experts=EXPERTS)
    module = PreferenceModule(backbone, DPOLoss(beta=2500.0), reference="adapter", keep_host_memory=False)
    module.configure_model()
    before = {"experts": named(module, "lora_"), "gate": named(module, "tlpo_fusion")}
    gate_dir = experts_dir / "gate"  # beside the experts, as the configs save it
    module, losses = fit(backbone, datamodule(tagged_pairs, DIMENSIONS), 1e-2, gate_dir)
    return {"module": module, "losses": losses, "before": before, "gate_dir": gate_dir}


def test_stage_two_trains_the_gate_only_and_inference_reloads_it(
    diffusion_builds, experts_dir, tagged_pairs, stage_two
):
    sd15 = str(diffusion_builds["sd15"])
    module, losses, before, gate_dir = (stage_two[k] for k in ("module", "losses", "before", "gate_dir"))
    experts, gate = before["experts"], before["gate"]
    assert experts and set(gate) == {f"tlpo_fusion.mixer.{n}" for n in ("proj_weight", "proj_bias", "bias")}
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses[0] != pytest.approx(math.log(2), abs=1e-4)  # the equal merge of trained experts is not the base
    after = named(module, "lora_")
    assert all(torch.equal(experts[n], after[n]) for n in experts)  # frozen experts, bit for bit
    moved = named(module, "tlpo_fusion")
    assert all(not torch.equal(gate[n], moved[n]) for n in gate)
    # the reference (every adapter off) is the checkpoint's UNet exactly; the gated model is not
    backbone = module.backbone
    batch = first_batch(tagged_pairs)
    policy = module.policy.eval()
    with torch.no_grad():
        with backbone.adapters_disabled(policy):
            reference = backbone.statistics(policy, batch)
        base = DiffusionBackbone(sd15).statistics(DiffusionBackbone(sd15).build().eval(), batch)
        trained = backbone.statistics(policy, batch)
        assert torch.equal(reference.logps, base.logps) and not torch.allclose(trained.logps, base.logps)
        # inference: the experts and the saved gate, loaded by name, give the trained model's statistics
        loaded = ExpertDiffusionBackbone(
            sd15, stage="inference", experts_dir=str(experts_dir), experts=EXPERTS, gate_dir=str(gate_dir)
        )
        torch.testing.assert_close(loaded.statistics(loaded.build().eval(), batch).logps, trained.logps)
        # the equal static merge (the gate's starting point) is not what the gate learnt
        equal = ExpertDiffusionBackbone(
            sd15, stage="inference", experts_dir=str(experts_dir), experts=EXPERTS, static_weights=[0.5, 0.5]
        )
        assert not torch.allclose(equal.statistics(equal.build().eval(), batch).logps, trained.logps)
    with pytest.raises(ValueError, match=r"gate\.json: the gate was trained against experts"):
        ExpertDiffusionBackbone(
            sd15, stage="inference", experts_dir=str(experts_dir), experts=EXPERTS[::-1], gate_dir=str(gate_dir)
        ).build()


def first_batch(path: Path):
    dm = datamodule(path, DIMENSIONS)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_gate_gradient_is_the_same_with_gradient_checkpointing(diffusion_builds, experts_dir, tagged_pairs):
    # Checkpointed layers recompute reading the weights of the denoiser's last call: the reference pass
    # between the policy's forward and backward runs at the same (t, ε), so the gradient must not change
    grads = []
    batch = first_batch(tagged_pairs)
    for checkpointing in (False, True):
        backbone = ExpertDiffusionBackbone(
            str(diffusion_builds["sd15"]), stage="gate", experts_dir=str(experts_dir), experts=EXPERTS,
            gate=GateSettings(init_std=0.5), gradient_checkpointing=checkpointing,
        )  # fmt: skip
        module = PreferenceModule(backbone, DPOLoss(beta=2500.0), reference="adapter", keep_host_memory=False)
        torch.manual_seed(0)  # the same initial gate
        module.configure_model()
        out, _, _ = module.compute(batch)  # policy pass, then the reference pass (adapters off)
        out.losses.mean().backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
    assert module.policy.denoiser.is_gradient_checkpointing
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-12)


def test_reference_copy_is_the_gate_at_its_start(diffusion_builds, experts_dir, tagged_pairs):
    backbone = ExpertDiffusionBackbone(
        str(diffusion_builds["sd15"]), stage="gate", experts_dir=str(experts_dir), experts=EXPERTS
    )
    module = PreferenceModule(backbone, DPOLoss(beta=2500.0), reference="copy", keep_host_memory=False)
    module.configure_model()
    batch = first_batch(tagged_pairs)
    out, policy, reference = module.compute(batch)
    torch.testing.assert_close(policy.logps.detach(), reference.logps)  # the equal merge is its own reference
    assert out.losses.mean().item() == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():  # the copy's gate is its own: moving the policy's leaves the reference as it was
        module.policy.denoiser.tlpo_fusion.mixer.bias.add_(torch.tensor([[0.3, -0.3]]))
    _, moved, again = module.compute(batch)  # the same batch object: the same (t, ε)
    assert torch.equal(again.logps, reference.logps) and not torch.allclose(moved.logps, policy.logps)


@pytest.mark.slow
def test_a_diffusers_pipeline_samples_with_the_gate_after_one_call(diffusion_builds, stage_two):
    from diffusers import StableDiffusionPipeline

    from mmpo.backbones.expert_io import load_tlpo
    from mmpo.sampling import SampleSettings, pipeline_for, sample_grid, sampling_scheduler

    sd15 = str(diffusion_builds["sd15"])
    settings = SampleSettings(seed=0, num_inference_steps=2, guidance_scale=4.0)  # guidance: 2N rows, one t
    prompts = ["a red circle ."]
    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None, requires_safety_checker=False)
    base = sample_grid(pipe, prompts, settings)
    load_tlpo(pipe.unet, stage_two["gate_dir"])  # experts from the gate folder's parent
    gated = sample_grid(pipe, prompts, settings)
    trained = pipeline_for(stage_two["module"].policy, sampling_scheduler(sd15))  # the trained policy itself
    torch.testing.assert_close(gated, sample_grid(trained, prompts, settings), rtol=0, atol=1e-5)
    assert not torch.allclose(gated, base, atol=1e-4)


def test_tuned_static_merge_is_a_gate_without_timestep_or_layers(diffusion_builds, experts_dir):
    gate = GateSettings(per_layer=False, timestep=False)
    backbone = ExpertDiffusionBackbone(
        str(diffusion_builds["sd15"]), stage="gate", experts_dir=str(experts_dir), experts=EXPERTS, gate=gate
    )
    model = backbone.build()
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"denoiser.tlpo_fusion.mixer.proj_bias": 2, "denoiser.tlpo_fusion.mixer.bias": 2}


def test_bad_input_names_the_file_record_and_expert(diffusion_builds, experts_dir, tagged_pairs, tmp_path):
    untagged = tagged_pairs.parent / "untagged.jsonl"  # beside the images
    lines = tagged_pairs.read_text().splitlines()
    rec = json.loads(lines[4])
    del rec["dimension"]
    untagged.write_text("\n".join([*lines[:4], json.dumps(rec), *lines[5:]]) + "\n")
    with pytest.raises(BadSampleError, match=rf"{re.escape(str(untagged))}:5: missing field 'dimension'"):
        datamodule(untagged, DIMENSIONS).setup("fit")
    kept = datamodule(tagged_pairs, ["lip_sync"])
    kept.setup("fit")
    assert [r.dimension for r in kept.datasets["train"].records] == ["lip_sync"] * 4
    everything = datamodule(untagged, None)  # no dimensions asked for: every pair, tagged or not
    everything.setup("fit")
    assert len(everything.datasets["train"].records) == 12
    with pytest.raises(FileNotFoundError, match=r"no saved expert 'lipsync'.*saved there: \["):
        ExpertDiffusionBackbone(
            str(diffusion_builds["sd15"]), stage="gate", experts_dir=str(experts_dir), experts=["lipsync"]
        ).build()
    with pytest.raises(ValueError, match="exactly one of gate_dir"):
        ExpertDiffusionBackbone("x", stage="inference", experts_dir=str(experts_dir), experts=EXPERTS)


def _stubbed_cli(
    config: Path, tiny: Path, experts_dir: Path, train_file: Path, monkeypatch, run: bool = False, extra=()
):
    monkeypatch.setattr(
        DiffusionBackbone, "load_pretrained", lambda self, *args: load_diffusion_model(str(tiny), None, self.dtype)
    )
    args = ["--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1"]
    args += [f"--data.init_args.train_file={train_file}", "--data.init_args.resolution=32"]
    args += ["--data.init_args.loader.num_workers=0"]
    if "gate" in config.stem:
        args += [f"--model.init_args.backbone.init_args.experts_dir={experts_dir}", f"--{EXPERTS_ARG}={EXPERTS}"]
    return MMPOCLI(args=[*args, *extra], run=run)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_tlpo_configs_parse_and_instantiate(config, diffusion_builds, monkeypatch, request):
    spec = yaml.safe_load(config.read_text())
    backbone_args = spec["model"]["init_args"]["backbone"]["init_args"]
    tiny, experts_dir = tiny_and_experts(spec, diffusion_builds, request)
    train_file, extra = config_data(spec, request)
    cli = _stubbed_cli(config, tiny, experts_dir, train_file, monkeypatch, extra=extra)
    backbone = cli.model.backbone
    assert type(backbone) is ExpertDiffusionBackbone and backbone.stage == backbone_args["stage"]
    assert cli.datamodule.dimensions == spec["data"]["init_args"]["dimensions"]
    cli.model.configure_model()
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    if backbone.stage == "expert":
        lora = backbone_args["lora"]["init_args"]
        assert backbone.expert in cli.model.policy.peft_config and cli.model.policy.active_adapter == backbone.expert
        adapted = {n.rsplit(".lora_A", 1)[0] for n in trainable if ".lora_A" in n}
        assert all(any(n.endswith(t) for n in adapted) for t in lora["target_modules"])  # every target matched
        assert trainable and all(
            f"lora_A.{backbone.expert}" in n or f"lora_B.{backbone.expert}" in n for n in trainable
        )
    else:
        assert (
            backbone_args["experts"] == DIMENSIONS
            and backbone.experts == EXPERTS
            and trainable
            and all("tlpo_fusion.mixer" in n for n in trainable)
        )
        for key, value in backbone_args["gate"]["init_args"].items():
            assert getattr(backbone.gate, key) == value, key
        fused = cli.model.policy.denoiser.tlpo_fusion.layers
        targets = EXPERT_TARGETS[TINY_FOR[backbone_args["model_name_or_path"]]]
        assert all(any(n.endswith(t) for n in fused) for t in targets)  # every expert target is fused
    lr = spec["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    assert cli.model.configure_optimizers().param_groups[0]["lr"] == lr


def _header_command(config: Path) -> str:
    (command,) = [m.group(1) for line in config.read_text().splitlines() if (m := re.match(r"#\s+(mmpo .*)", line))]
    return command


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_tlpo_config_header_command_runs_on_a_tiny_model(config, diffusion_builds, tmp_path, monkeypatch, request):
    spec = yaml.safe_load(config.read_text())
    tiny, experts_dir = tiny_and_experts(spec, diffusion_builds, request)
    train_file, extra = config_data(spec, request)
    argv = [a.replace("YOUR/train.jsonl", str(train_file)) for a in shlex.split(_header_command(config))[1:]]
    if "gate" in config.stem:
        argv += [f"--model.init_args.backbone.init_args.experts_dir={experts_dir}", f"--{EXPERTS_ARG}={EXPERTS}"]
    monkeypatch.chdir(REPO)
    main(argv + tiny_run_args(tiny, tmp_path) + extra)
    saved = tmp_path / "out"
    if "gate" in config.stem:
        info = json.loads((saved / "gate.json").read_text())
        assert [e["name"] for e in info["experts"]] == EXPERTS and (saved / "gate.safetensors").is_file()
    else:
        assert json.loads((saved / "adapter_config.json").read_text())["r"] == 4
