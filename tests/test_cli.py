import dataclasses
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmpo.backbones import VisionLanguageBackbone
from mmpo.cli import MMPOCLI, main

REPO = Path(__file__).resolve().parents[1]
# complete configs: the top level and the ranked-data recipes (Curry-DPO, DPA)
CONFIGS = sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "configs" / "ranked").glob("*.yaml")])
_HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _strategy(spec: dict):
    """Instantiate a ``trainer.strategy`` entry of a config (class_path + init_args) as LightningCLI does."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    return parser.instantiate_classes(parser.parse_object({"strategy": spec})).strategy


def test_every_config_the_docs_name_is_one_the_next_test_instantiates():
    # The README and docs point users at configs by path: each must be one that is parsed and built below
    # (configs/mia_dpo/ has its own test in test_mia_demo.py), so a renamed or missing config fails here.
    import re

    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {m for doc in docs for m in re.findall(r"configs/[\w./-]+?\.yaml", doc.read_text())}
    top_level = {n for n in named if "/" not in n.removeprefix("configs/")}
    assert "configs/quickstart.yaml" in top_level  # the README's own quickstart is among them
    assert top_level <= {f"configs/{p.name}" for p in CONFIGS}
    ranked = {n for n in named if n.startswith("configs/ranked/")}
    assert ranked <= {str(p.relative_to(REPO)) for p in CONFIGS}
    # below the top level: the MIA-DPO stages (tests/test_mia_demo.py), the partial logging configs
    # (tests/test_loggers.py), the partial QLoRA config (its command: tests/test_commands.py), the diffusion
    # configs (tests/test_diffusion_training.py builds them and runs their commands); configs/ranked/ is built below;
    # the iterative and partial loss configs (tests/test_iterative.py, test_unpaired_data.py,
    # test_losses_token_level.py; test_commands.py runs their commands); TLPO's stages (tests/test_tlpo_training.py)
    below = (
        "configs/mia_dpo/", "configs/logging/", "configs/quantization/", "configs/diffusion/", "configs/ranked/",
        "configs/iterative/", "configs/losses/", "configs/families/", "configs/tlpo/",
    )  # fmt: skip
    assert {n for n in named - top_level if not n.startswith(below)} == set()


def _assert_built_as_written(cli, spec: dict) -> None:
    """The objects LightningCLI built carry the config's values, not only its class names."""
    model_args = spec["model"]["init_args"]
    for key, value in model_args["loss"].get("init_args", {}).items():
        assert getattr(cli.model.loss, key) == value, key
    backbone_args = dict(model_args["backbone"]["init_args"])
    lora = backbone_args.pop("lora", None)
    for key, value in backbone_args.items():
        assert getattr(cli.model.backbone, key) == value, key
    assert cli.model.save_dir == model_args.get("save_dir")
    trainable = {n: p for n, p in cli.model.named_parameters() if p.requires_grad}
    if lora is not None:  # the adapter has the config's rank and scaling, and only the adapter trains
        settings = cli.model.policy.peft_config["default"]
        lora_args = lora["init_args"]
        assert (settings.r, settings.lora_alpha, settings.lora_dropout) == (
            lora_args["r"], lora_args["alpha"], lora_args["dropout"]
        )  # fmt: skip
        ranks = {p.shape[0] for n, p in trainable.items() if "lora_A" in n}  # lora_A: (r, in_features)
        assert ranks == {lora_args["r"]} and all("lora_" in n for n in trainable)
    else:  # full fine-tuning: the language model trains
        assert any("language_model" in n for n in trainable)
    optimizer = cli.model.configure_optimizers()
    scheduler = None
    if isinstance(optimizer, dict):
        optimizer, scheduler = optimizer["optimizer"], optimizer["lr_scheduler"]["scheduler"]
    want_optimizer = model_args["optimizer"]
    assert type(optimizer).__name__ == want_optimizer["class_path"].rsplit(".", 1)[1]
    (group,) = optimizer.param_groups
    assert group["params"] and all(p.requires_grad for p in group["params"])
    assert len(group["params"]) == len(trainable)
    for key, value in want_optimizer["init_args"].items():
        assert group.get(f"initial_{key}", group[key]) == value, key  # a scheduler rescales lr from the start
    want_scheduler = model_args.get("scheduler")
    assert (type(scheduler).__name__ if scheduler else None) == (
        want_scheduler["class_path"].rsplit(".", 1)[1] if want_scheduler else None
    )
    data_args = dict(spec["data"]["init_args"])
    # a config that names no processor gets the backbone's checkpoint (the CLI's argument link)
    assert cli.datamodule.processor_name == data_args.pop("processor", backbone_args["model_name_or_path"])
    assert cli.datamodule.files["train"] == data_args.pop("train_file")
    assert cli.datamodule.files["val"] == data_args.pop("val_file", None)
    for key, value in data_args.items():
        built = getattr(cli.datamodule, key)
        if dataclasses.is_dataclass(built):  # a settings group: each field as written, the others at defaults
            assert {k: getattr(built, k) for k in value} == value, key
        else:
            assert built == value, key
    trainer_args = spec["trainer"]
    assert cli.trainer.max_epochs == trainer_args["max_epochs"]
    assert cli.trainer.precision == trainer_args["precision"]
    assert cli.trainer.accumulate_grad_batches == trainer_args.get("accumulate_grad_batches", 1)
    assert cli.trainer.gradient_clip_val == trainer_args.get("gradient_clip_val")
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {c["class_path"].rsplit(".", 1)[1] for c in trainer_args.get("callbacks", [])} <= callbacks


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_instantiates(config, tiny_llava, monkeypatch):
    # Model loading is pointed at the tiny LLaVA; everything else is the config as written.
    from transformers import AutoModelForImageTextToText

    monkeypatch.setattr(
        VisionLanguageBackbone, "load_pretrained", lambda self: AutoModelForImageTextToText.from_pretrained(tiny_llava)
    )
    spec = yaml.safe_load(config.read_text())
    overrides = ["--trainer.accelerator=cpu", "--trainer.devices=1"]
    if "strategy" in spec["trainer"]:  # multi-GPU strategies refuse a CPU: check the strategy on its own
        # DeepSpeed's needs the optional `deepspeed` package (checked where installed, test below)
        if "DeepSpeed" not in spec["trainer"]["strategy"]["class_path"] or _HAS_DEEPSPEED:
            strategy = _strategy(spec["trainer"]["strategy"])
            assert type(strategy).__name__ == spec["trainer"]["strategy"]["class_path"].rsplit(".", 1)[1]
        overrides.append("--trainer.strategy=auto")
    cli = MMPOCLI(args=["--config", str(config), *overrides], run=False)
    want_loss = spec["model"]["init_args"]["loss"]["class_path"].rsplit(".", 1)[1]
    assert type(cli.model.loss).__name__ == want_loss
    assert type(cli.datamodule).__name__ == spec["data"]["class_path"].rsplit(".", 1)[1]
    cli.model.configure_model()  # LoRA targets must match the model's module names
    _assert_built_as_written(cli, spec)


def test_deepspeed_config_builds_a_zero2_bf16_trainer():
    pytest.importorskip("deepspeed", reason="the DeepSpeed config needs the optional `deepspeed` extra")
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from mmpo.checkpoint_io import AtomicCheckpointIO

    config = REPO / "configs/llava15_7b_dpo_lora_deepspeed.yaml"
    spec = yaml.safe_load(config.read_text())
    strategy = _strategy(spec["trainer"]["strategy"])
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == 2 and strategy.exclude_frozen_parameters
    # The whole trainer, strategy included, on a CPU: Lightning refuses to *run* DeepSpeed without CUDA,
    # but building it checks that strategy, precision and mmpo's checkpoint plugin go together.
    cli = MMPOCLI(args=["--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)
    assert isinstance(cli.trainer.strategy, DeepSpeedStrategy)
    assert isinstance(cli.trainer.precision_plugin, DeepSpeedPrecision)
    assert cli.trainer.precision_plugin.precision == "bf16-mixed"
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # unused: DeepSpeed writes its own
    assert cli.model.on_nonfinite == "stop"  # DeepSpeed cannot skip a step


def test_print_config_through_the_console_script():
    out = subprocess.run(
        [sys.executable, "-m", "mmpo.cli", "fit", "--config", "configs/quickstart.yaml", "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["init_args"]["loss"]["class_path"] == "mmpo.losses.DPOLoss"
    assert printed["model"]["init_args"]["loss"]["init_args"]["beta"] == 0.1


def _fit_args(world, tiny_llava, root, epochs, extra=()):
    return [
        "fit",
        "--config",
        str(REPO / "configs/quickstart.yaml"),
        f"--model.init_args.backbone.init_args.model_name_or_path={tiny_llava}",
        f"--model.init_args.save_dir={root}/adapter",
        f"--data.init_args.train_file={world}/train.jsonl",
        f"--data.init_args.val_file={world}/val.jsonl",
        "--data.init_args.loader.batch_size=4",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_checkpointing=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        *extra,
    ]


def _adapter(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(root / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_fit_through_the_cli_then_resume_matches_an_uninterrupted_run(world, tiny_llava, tmp_path):
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    main(_fit_args(world, tiny_llava, straight, epochs=2))
    main(_fit_args(world, tiny_llava, first, epochs=1))
    ckpts = sorted((first / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state)  # trainable weights only
    main(_fit_args(world, tiny_llava, resumed, epochs=2, extra=[f"--ckpt_path={ckpts[0]}"]))

    a, b, c = _adapter(straight), _adapter(first), _adapter(resumed)
    assert a.keys() == c.keys() and a
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(a[k], b[k]) for k in a)  # the second epoch did change the adapter


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_subcommands_log_trl_metrics(world, tiny_llava, tmp_path, subcommand):
    args = _fit_args(world, tiny_llava, tmp_path, epochs=1)
    args[0] = subcommand
    args += [f"--data.init_args.test_file={world}/val.jsonl", "--trainer.limit_test_batches=1"]
    cli = MMPOCLI(args=args)
    stage = "val" if subcommand == "validate" else "test"
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    # a fresh LoRA adapter is the identity: policy equals reference, so every reward is 0, no margin is
    # positive, and the DPO loss is log 2
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[f"{stage}/{name}"] == 0, name
    assert metrics[f"{stage}/loss"] == pytest.approx(math.log(2), abs=1e-5)
    # the log-probs are those of the base model on the one batch evaluated, computed here the naive way
    # (full logits, one row per response) instead of the module's shared-prefix forward
    from mmpo.logprobs import response_logprobs

    loader = cli.datamodule.val_dataloader() if stage == "val" else cli.datamodule.test_dataloader()
    batch = next(iter(loader))
    model = cli.model.policy.eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.row_media()).logits
    sums = response_logprobs(logits, batch.input_ids, batch.response_mask).sum(-1)
    chosen, rejected = sums[: batch.num_pairs], sums[batch.num_pairs :]
    assert metrics[f"{stage}/logps/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-4)
    assert metrics[f"{stage}/logps/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-4)
    assert metrics[f"{stage}/logps/accuracies"] == pytest.approx((chosen > rejected).float().mean().item())
