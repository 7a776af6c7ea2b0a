"""``mmpo export``: the merged model loads and generates with transformers alone, as the adapter did with peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpo.cli import main

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter that imports transformers and torch only: load the merged model, run it on the
# world's first record, and save its inputs, logits, greedy tokens and which other packages were imported.
TRANSFORMERS_ONLY = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

merged, world, out = sys.argv[1:4]
record = json.loads(open(f"{world}/train.jsonl").readline())
processor = AutoProcessor.from_pretrained(merged)
model = AutoModelForImageTextToText.from_pretrained(merged).eval()
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["prompt"]}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
image = Image.open(f"{world}/{record['images'][0]}").convert("RGB")
enc = processor(text=[text], images=[[image]], return_tensors="pt")
with torch.no_grad():
    logits = model(**enc).logits
    tokens = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=processor.tokenizer.pad_token_id)
others = sorted({m.split(".")[0] for m in sys.modules} & {"peft", "mmpo", "datamodules", "lightning", "augment"})
torch.save({"inputs": dict(enc), "logits": logits, "tokens": tokens, "others": others}, out)
"""


def _run_transformers_only(merged: Path, world: Path, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_ONLY, str(merged), str(world), str(out)],
        cwd=out.parent, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def adapter(tiny_llava, tmp_path_factory) -> Path:
    """An mmpo adapter with random LoRA weights (B too, so the merge changes the model), saved by the backbone."""
    from mmpo.backbones import LoraSettings, VisionLanguageBackbone

    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    model = backbone.build()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    backbone.save(model, out)
    return out


def _peft_model(tiny_llava: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    return PeftModel.from_pretrained(base, adapter).eval()


def test_merged_model_matches_the_adapter_with_transformers_alone(adapter, tiny_llava, world, tmp_path, capsys):
    merged = tmp_path / "merged"
    main(["export", str(adapter), str(merged)])
    printed = capsys.readouterr().out
    for step in ("loading the base model", "loading the adapter", "merging", "saving to", "done"):
        assert step in printed, step
    assert not list(tmp_path.glob(".merged.*"))  # the temporary sibling was renamed
    assert (merged / "config.json").is_file() and (merged / "processor_config.json").is_file()
    saved = load_file(merged / "model.safetensors")
    assert saved and not any("lora_" in k or "base_layer" in k for k in saved)  # plain transformers weights

    got = _run_transformers_only(merged, world, tmp_path / "merged_out.pt")
    assert got["others"] == []  # neither peft nor mmpo was imported to load and run it
    model, inputs = _peft_model(tiny_llava, adapter), got["inputs"]
    with torch.no_grad():
        want = model(**inputs).logits
        want_tokens = model.generate(**inputs, do_sample=False, max_new_tokens=8, pad_token_id=0)
        with model.disable_adapter():
            base = model(**inputs).logits
    assert (want - base).abs().max() > 0.1  # the adapter changes the model, so the merge is seen
    torch.testing.assert_close(got["logits"], want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got["tokens"], want_tokens)
    assert got["tokens"].shape[1] > inputs["input_ids"].shape[1]  # it generated


def _fit_args(world: Path, tiny_llava: Path, root: Path, config: str, steps: int) -> list[str]:
    return [
        "fit",
        "--config", str(REPO / config),
        f"--model.init_args.backbone.init_args.model_name_or_path={tiny_llava}",
        f"--model.init_args.save_dir={root}/saved",
        f"--data.init_args.train_file={world}/train.jsonl",
        f"--data.init_args.val_file={world}/val.jsonl",
        "--data.init_args.loader.batch_size=4",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
    ]  # fmt: skip


@pytest.mark.slow
def test_export_from_a_checkpoint_and_config_equals_export_from_the_adapter(world, tiny_llava, tmp_path):
    root = tmp_path / "run"
    main(_fit_args(world, tiny_llava, root, "configs/quickstart.yaml", steps=3))
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    config = root / "config.yaml"  # LightningCLI's record of the run's whole configuration
    main(["export", str(root / "saved"), str(tmp_path / "from_adapter")])
    main(["export", str(ckpt), str(tmp_path / "from_ckpt"), "--config", str(config)])
    a, b = load_file(tmp_path / "from_adapter/model.safetensors"), load_file(tmp_path / "from_ckpt/model.safetensors")
    base = load_file(tiny_llava / "model.safetensors")
    assert a.keys() == b.keys() == base.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)
    changed = [k for k in a if not torch.equal(a[k], base[k])]
    # three DPO steps trained every LoRA pair, so every targeted projection of the language model moved
    assert changed and all("language_model" in k and k.endswith("proj.weight") for k in changed)
    assert json.loads((tmp_path / "from_ckpt/config.json").read_text())["model_type"] == "llava"


@pytest.mark.slow
def test_export_of_a_full_fine_tuning_checkpoint_writes_the_trained_weights(world, tiny_llava, tmp_path):
    root = tmp_path / "run"
    main(_fit_args(world, tiny_llava, root, "configs/quickstart_sft.yaml", steps=1))
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    main(["export", str(ckpt), str(tmp_path / "out"), "--config", str(root / "config.yaml")])
    trained = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    exported, saved = load_file(tmp_path / "out/model.safetensors"), load_file(root / "saved/model.safetensors")
    assert exported.keys() == saved.keys() and len(trained) > 0
    for k in exported:  # the export equals the full model the run saved itself
        torch.testing.assert_close(exported[k], saved[k], atol=0, rtol=0)


def test_dtype_option_saves_bfloat16_weights(adapter, tmp_path):
    main(["export", str(adapter), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    saved = load_file(tmp_path / "bf16/model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16/config.json").read_text())["dtype"] == "bfloat16"


def _fails(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["export", *argv])
    return str(stop.value.code)


def test_clear_errors(adapter, tiny_llava, tmp_path):
    out = str(tmp_path / "out")
    assert "does not exist" in _fails([str(tmp_path / "missing"), out])
    message = _fails([str(tiny_llava), out])
    assert "no adapter_config.json" in message and "full model" in message
    (tmp_path / "empty").mkdir()
    assert "no adapter_config.json" in _fails([str(tmp_path / "empty"), out])

    moved = tmp_path / "moved-adapter"  # its base model is no longer where training found it
    moved.mkdir()
    for f in adapter.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "runs/gone/model"}))
    message = _fails([str(moved), out])
    assert "runs/gone/model" in message and "not found" in message and "--base" in message
    assert "pass --base" not in _fails([str(adapter), out, "--base", str(tmp_path / "nowhere")])  # it was given

    (tmp_path / "taken").mkdir()
    assert "--overwrite" in _fails([str(adapter), str(tmp_path / "taken")])
    assert "replace the source" in _fails([str(adapter), str(adapter.parent), "--overwrite"])
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert "--config" in _fails([str(ckpt), out])
    assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_no_output_and_keeps_the_old_one(adapter, tmp_path, monkeypatch):
    import mmpo.export as export

    class BrokenProcessor:
        def save_pretrained(self, path):
            raise OSError("disk full")

    monkeypatch.setattr(export, "_load_processor", lambda sources, trust_remote_code: BrokenProcessor())
    with pytest.raises(OSError, match="disk full"):
        main(["export", str(adapter), str(tmp_path / "new")])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the output nor its temporary sibling

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("previous export")
    with pytest.raises(OSError, match="disk full"):
        main(["export", str(adapter), str(old), "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and (old / "keep.txt").read_text() == "previous export"
