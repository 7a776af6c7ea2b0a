"""Every ``mmpo`` command the README and the config headers show, run on the tiny model.

The real-model configs run as written except for what a CPU test must change: the checkpoint (the
tiny LLaVA, or its video form), the device (CPU, one process, the default strategy), one step, and
the output directories. The quickstart runs at toy size, then its two stage commands. The MIA-DPO
commands are run by ``tests/test_mia_demo.py::test_demo_runs_end_to_end_at_toy_size`` (the demo
drives those configs through the same CLI), which is named below so that a new command without a
test fails here.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml
from helpers.data import write_rewards, write_unpaired

from mmpo.backbones.quantization import bitsandbytes_unavailable
from mmpo.cli import main

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER_DATA = ("YOUR/train.jsonl", "data/train.jsonl")
# placeholders for data of another shape, written from the shapes world (image paths relative to it)
PLACEHOLDER_WRITERS = {"data/unpaired.jsonl": write_unpaired, "YOUR/rewards.jsonl": write_rewards}
MIA_DEMO_TEST = "tests/test_mia_demo.py::test_demo_runs_end_to_end_at_toy_size"
RUN_ELSEWHERE = {
    "mmpo mia-demo": MIA_DEMO_TEST,
    "mmpo diffusion-demo": (
        "tests/test_diffusion_demo.py::test_the_demo_runs_end_to_end_and_its_pairs_are_ordered_by_reward"
    ),
    "mmpo build-negatives --config configs/mia_dpo/build.yaml": MIA_DEMO_TEST,
    "mmpo fit --config configs/mia_dpo/sft.yaml": MIA_DEMO_TEST,
    "mmpo fit --config configs/mia_dpo/dpo.yaml": MIA_DEMO_TEST,
    "mmpo validate --config configs/mia_dpo/dpo.yaml": MIA_DEMO_TEST,
    # the diffusion configs: a tiny diffusion model and pairs, not the tiny LLaVA
    **{
        f"mmpo fit --config configs/diffusion/{name}_dpo_lora.yaml --data.init_args.train_file=YOUR/train.jsonl": (
            "tests/test_diffusion_training.py::test_config_header_command_runs_on_a_tiny_model"
        )
        for name in ("sd15", "sdxl", "sd3_medium")
    },
    "mmpo fit --config configs/diffusion/sd15_sft_lora.yaml --data.init_args.train_file=YOUR/train.jsonl": (
        "tests/test_diffusion_sampling.py::test_sft_config_header_command_trains_saves_and_samples"
    ),
    # RankDPO (ranked lists of images) and DCPO (a caption per image): tiny diffusion model, lists / dual-caption pairs
    "mmpo fit --config configs/diffusion/sd15_rankdpo_lora.yaml --data.init_args.train_file=YOUR/ranked.jsonl": (
        "tests/test_diffusion_training.py::test_config_header_command_runs_on_a_tiny_model"
    ),
    "mmpo fit --config configs/diffusion/sd15_dcpo_lora.yaml --data.init_args.train_file=YOUR/train.jsonl": (
        "tests/test_diffusion_training.py::test_config_header_command_runs_on_a_tiny_model"
    ),
    # Wan 2.1 text-to-video: tiny Wan build, pairs of mp4 clips
    "mmpo fit --config configs/diffusion/wan21_t2v_1_3b_dpo_lora.yaml --data.init_args.train_file=YOUR/videos.jsonl": (
        "tests/test_diffusion_training.py::test_config_header_command_runs_on_a_tiny_model"
    ),
    # D3PO: trajectory pairs sampled from the tiny SD 1.5
    "mmpo fit --config configs/diffusion/sd15_d3po_lora.yaml --data.init_args.train_file=YOUR/trajectories.jsonl": (
        "tests/test_diffusion_training.py::test_config_header_command_runs_on_a_tiny_model"
    ),
    # SmPO (scored pairs, inverted noise): tiny diffusion model, pairs with scores on every record
    "mmpo fit --config configs/diffusion/sd15_smpo_lora.yaml --data.init_args.train_file=YOUR/scored.jsonl": (
        "tests/test_diffusion_training.py::test_config_header_command_runs_on_a_tiny_model"
    ),
    # TLPO's two stages: tiny diffusion model, pairs tagged with a dimension, the gate over stage-1 experts
    **{
        f"mmpo fit --config configs/tlpo/{name}.yaml --data.init_args.train_file=YOUR/train.jsonl": (
            "tests/test_tlpo_training.py::test_tlpo_config_header_command_runs_on_a_tiny_model"
        )
        for name in ("sd15_expert_lora", "sd15_gate", "sd3_medium_gate", "wan21_t2v_1_3b_gate")
    },
    # the model families' configs over the LLaVA recipe: each built on its family's tiny model
    **{
        f"mmpo fit --config configs/llava15_7b_dpo_lora.yaml --config configs/families/{p.stem}.yaml "
        "--data.init_args.train_file=YOUR/train.jsonl": (
            f"tests/test_families.py::test_family_config_over_the_llava_recipe_builds_the_family_with_its_default_lora[{p.stem}]"
        )
        for p in sorted((REPO / "configs" / "families").glob("*.yaml"))
    },
    # Curry-DPO: ranked records and 4 steps across a curriculum stage boundary
    "mmpo fit --config configs/ranked/curry_dpo_lora.yaml --data.init_args.train_file=YOUR/ranked.jsonl": (
        "tests/test_iterative.py::test_curry_dpo_config_header_command_runs_on_a_tiny_model"
    ),
    # the partial logging configs, each after the quickstart's (W&B offline, MLflow to a local folder)
    "mmpo fit --config configs/quickstart.yaml --config configs/logging/mlflow.yaml": (
        "tests/test_loggers.py::test_mlflow_config_logs_a_run_offline"
    ),
    "mmpo fit --config configs/quickstart.yaml --config configs/logging/wandb.yaml": (
        "tests/test_loggers.py::test_wandb_config_logs_a_run_offline"
    ),
}
QUICKSTART = (
    "mmpo quickstart",
    "mmpo fit --config configs/quickstart_sft.yaml",
    "mmpo fit --config configs/quickstart.yaml",
)


def shown_commands() -> dict[str, list[str]]:
    """Command → where it is shown: README code blocks and the comment header of every config."""
    found: dict[str, list[str]] = {}

    def add(line: str, where: str) -> None:
        command = line.split(" #", 1)[0].strip()
        found.setdefault(command, []).append(where)

    in_block = False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and line.startswith("mmpo "):
            add(line, "README.md")
    for config in sorted((REPO / "configs").rglob("*.yaml")):
        for line in config.read_text().splitlines():
            if not line.startswith("#"):
                break
            match = re.match(r"#\s+(mmpo .*)", line)
            if match:
                add(match.group(1), str(config.relative_to(REPO)))
    return found


def _real_model_commands() -> list[str]:
    return sorted(c for c in shown_commands() if c not in RUN_ELSEWHERE and c not in QUICKSTART)


def test_every_shown_command_has_a_test():
    commands = shown_commands()
    assert "mmpo fit --config configs/llava15_7b_dpo_lora.yaml --data.init_args.train_file=data/train.jsonl" in commands
    untested = {c: w for c, w in commands.items() if c not in RUN_ELSEWHERE and c not in QUICKSTART}
    for command in untested:  # what test_real_model_command runs: a config of its own, trained or printed
        argv = shlex.split(command)
        assert argv[:3] == ["mmpo", "fit", "--config"] and (REPO / argv[3]).is_file(), command
    assert set(QUICKSTART) <= set(commands)


def _command_id(command: str) -> str:
    argv = shlex.split(command)
    extra = "-print_config" if "--print_config" in argv else ("-readme" if "data/train.jsonl" in command else "")
    configs = [Path(argv[i + 1]).stem for i, a in enumerate(argv[:-1]) if a == "--config"]
    return "+".join(configs) + extra


@pytest.mark.slow
@pytest.mark.parametrize("command", _real_model_commands(), ids=_command_id)
def test_real_model_command(command, world, tiny_llava, video_world, video_llava, tmp_path, monkeypatch, capsys):
    argv = shlex.split(command)[1:]
    config = yaml.safe_load((REPO / argv[2]).read_text())
    if "quantization" in command and bitsandbytes_unavailable() is not None:
        pytest.skip(str(bitsandbytes_unavailable()))
    monkeypatch.chdir(REPO)
    if "--print_config" in argv:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code in (None, 0)
        printed = yaml.safe_load(capsys.readouterr().out)
        loss = config["model"]["init_args"]["loss"]
        assert printed["model"]["init_args"]["loss"]["class_path"] == loss["class_path"]
        assert printed["model"]["init_args"]["loss"]["init_args"]["beta"] == loss["init_args"]["beta"]
        assert printed["data"]["init_args"]["max_length"] == config["data"]["init_args"]["max_length"]
        return
    video = "Video" in config["data"]["class_path"]
    model = video_llava if video else tiny_llava
    data = str(video_world["train"]) if video else str(world / "train.jsonl")
    argv = [next((a.replace(p, data) for p in PLACEHOLDER_DATA if p in a), a) for a in argv]
    written = [(p, write(world, tmp_path / Path(p).name)) for p, write in PLACEHOLDER_WRITERS.items() if p in command]
    for placeholder, _ in written:
        argv = [a.replace(placeholder, str(tmp_path / Path(placeholder).name)) for a in argv]
    overrides = [f"--data.init_args.data_root={world}"] if written else []
    overrides += [
        f"--model.init_args.backbone.init_args.model_name_or_path={model}",
        f"--model.init_args.save_dir={tmp_path / 'out'}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_steps=1",  # an optimizer step: up to 8 batches where a config accumulates gradients
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    if "strategy" in config["trainer"]:
        overrides.append("--trainer.strategy=auto")  # FSDP / DeepSpeed need GPUs; their configs are checked in test_cli
    if "processor_kwargs" in config["data"]["init_args"]:
        overrides.append("--data.init_args.processor_kwargs=null")  # Qwen2-VL's pixel bounds mean nothing to LLaVA
    main(argv + overrides)
    saved = tmp_path / "out"
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
    lora = config["model"]["init_args"]["backbone"]["init_args"]["lora"]["init_args"]
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == lora["r"]


@pytest.mark.slow
def test_quickstart_and_its_stage_commands(tmp_path, monkeypatch, capsys, recwarn, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    main(["quickstart", "--n-train", "24", "--n-val", "8", "--sft-epochs", "1", "--dpo-epochs", "1"])
    out = capsys.readouterr().out
    table = out[out.index("mmpo quickstart: DPO on the shapes world") :]
    for label in ("DPO loss", "reward accuracy", "reward margin", "log-prob chosen"):
        assert re.search(rf"^{label} +-?\d+\.\d{{4}} +-?\d+\.\d{{4}}$", table, re.M), label
    results = json.loads((tmp_path / "runs/quickstart/results.json").read_text())
    before, after = results["before"], results["after"]
    # before DPO the policy is its own reference (a fresh adapter): loss ln 2, rewards 0
    assert before["val/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert before["val/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert after["val/loss"] != before["val/loss"] and math.isfinite(after["val/loss"])
    assert (tmp_path / "runs/quickstart/dpo-adapter/adapter_config.json").is_file()
    # library messages a user cannot act on are silenced (mmpo.quiet, datamodules.core.loaders)
    noise = ("LeafSpec", "is_gradient_checkpointing", "set_vital")
    assert not [str(w.message) for w in recwarn if any(n in str(w.message) for n in noise)]
    assert "litlogger" not in caplog.text and "litlogger" not in out
    for command in QUICKSTART[1:]:
        argv = shlex.split(command)[1:] + [
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path / 'stage'}",
            f"--model.init_args.save_dir={tmp_path / 'stage-out'}",
            "--trainer.enable_progress_bar=false",
        ]
        main(argv)
        assert (tmp_path / "stage-out").is_dir()
