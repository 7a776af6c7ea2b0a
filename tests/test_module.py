import json

import pytest
import torch
from helpers.trainers import quiet_trainer

from datamodules import ImagePreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.logprobs import response_logprobs
from mmpo.losses import DPOLoss, SimPOLoss
from mmpo.module import PreferenceModule


@pytest.fixture(scope="module")
def batch(first_batch):
    return first_batch


def _module(tiny_llava, lora=True, loss=None, **kw):
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0) if lora else None)
    module = PreferenceModule(backbone, loss or DPOLoss(beta=0.1), **kw)
    module.configure_model()
    return module


def test_reference_modes_follow_lora_and_loss(tiny_llava):
    assert _module(tiny_llava, lora=True).reference_mode == "adapter"
    assert _module(tiny_llava, lora=False).reference_mode == "copy"
    assert _module(tiny_llava, lora=True, loss=SimPOLoss()).reference_mode == "none"
    with pytest.raises(ValueError, match="needs a LoRA backbone"):
        PreferenceModule(VisionLanguageBackbone(str(tiny_llava)), DPOLoss(), reference="adapter")
    with pytest.raises(ValueError, match="needs a reference model"):
        PreferenceModule(VisionLanguageBackbone(str(tiny_llava)), DPOLoss(), reference="none")


def test_lora_trains_only_the_language_model_adapter(tiny_llava):
    module = _module(tiny_llava)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)


def test_full_finetuning_freezes_the_vision_tower_only(tiny_llava):
    module = _module(tiny_llava, lora=False)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen and all("vision_tower" in n for n in frozen)
    assert any("multi_modal_projector" in n for n, p in module.named_parameters() if p.requires_grad)


def test_lean_logps_equal_full_logits_path(tiny_llava, batch):
    module = _module(tiny_llava, lora=False)
    model = module.policy.eval()
    fast = module.backbone.token_logps(model, batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.row_media()).logits
    naive = response_logprobs(logits, batch.input_ids, batch.response_mask)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)
    assert fast[batch.response_mask].lt(0).all() and fast[~batch.response_mask].eq(0).all()


@pytest.mark.parametrize("lora", [True, False])
def test_rewards_start_at_zero_and_dpo_steps_widen_the_margin(tiny_llava, batch, lora):
    torch.manual_seed(0)
    module = _module(tiny_llava, lora=lora)
    module.policy.eval()  # no dropout: compare exact values
    out, _, _ = module.compute(batch)
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, 0.6931472), atol=1e-6, rtol=0)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(5):
        out, _, _ = module.compute(batch)
        opt.zero_grad()
        out.losses.mean().backward()
        opt.step()
    out, _, _ = module.compute(batch)
    assert (out.chosen_rewards - out.rejected_rewards).mean() > 0
    assert out.losses.mean() < 0.6931


def test_export_loads_with_standard_apis(tiny_llava, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    module = _module(tiny_llava)
    with torch.no_grad():
        for n, p in module.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # make the adapter non-trivial
    module.policy.eval()
    want = module.backbone.token_logps(module.policy, batch)
    module.export(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    exported, original = AutoProcessor.from_pretrained(tmp_path / "adapter"), AutoProcessor.from_pretrained(tiny_llava)
    text = "describe the image ."
    assert exported.tokenizer(text)["input_ids"] == original.tokenizer(text)["input_ids"]
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(module.backbone.token_logps(loaded, batch), want)

    full = _module(tiny_llava, lora=False)
    with torch.no_grad():  # a changed language-model weight must survive the export
        next(p for n, p in full.policy.named_parameters() if "language_model" in n and "q_proj" in n).add_(0.05)
    full.policy.eval()
    want = full.backbone.token_logps(full.policy, batch)
    full.export(tmp_path / "full")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "full").eval()
    torch.testing.assert_close(full.backbone.token_logps(reloaded, batch), want)


def test_checkpoint_keeps_trainable_weights_only(tiny_llava):
    module = _module(tiny_llava)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])


def test_undecodable_images_in_workers_are_counted_and_reported_not_fatal(world, tiny_llava, tmp_path):
    import json
    import shutil

    import lightning as L

    data = tmp_path / "data"
    shutil.copytree(world, data)
    (data / "images" / "train-000001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:8]]
    (data / "small.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = ImagePreferenceDataModule(
        str(tiny_llava),
        train_file=str(data / "small.jsonl"),
        on_bad_sample="skip",
        loader={"batch_size": 4, "num_workers": 2},
    )
    module = PreferenceModule(VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4)), DPOLoss())
    seen = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch.skipped, batch.num_pairs))

    trainer = quiet_trainer(max_epochs=1, callbacks=[Count()], default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="1 bad record"):
        trainer.fit(module, datamodule=dm)
    assert sum(s for s, _ in seen) == 1 and sum(n for _, n in seen) == 7
    assert trainer.callback_metrics["train/data/skipped"] == 1


def test_reference_strategies_compute_what_they_name(tiny_llava, batch):
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_llava).eval()
    with torch.no_grad():
        want = VisionLanguageBackbone(str(tiny_llava)).statistics(base, batch).logps
    adapter = _module(tiny_llava, lora=True)
    with torch.no_grad():
        for n, p in adapter.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # the policy now differs from its base model
    adapter.policy.eval()
    _, policy, reference = adapter.compute(batch)
    torch.testing.assert_close(reference.logps, want)  # the disabled adapter is the base model
    assert not torch.allclose(policy.logps, want)
    copy = _module(tiny_llava, lora=False)
    with torch.no_grad():
        for p in copy.policy.parameters():
            if p.requires_grad:
                p.add_(0.01)  # a "trained" policy: the frozen copy keeps the weights it was made with
    copy.policy.eval()
    _, _, frozen = copy.compute(batch)
    torch.testing.assert_close(frozen.logps, want)
    _, _, none = _module(tiny_llava, lora=True, loss=SimPOLoss()).compute(batch)
    assert none is None
