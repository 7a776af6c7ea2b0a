"""QLoRA: a 4- or 8-bit base (bitsandbytes) with LoRA on top and the disabled adapter as the reference.

Runs where bitsandbytes loads on this machine (its CPU backend included) and is skipped, with the
reason, elsewhere.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.trainers import quiet_trainer

from datamodules import ImagePreferenceDataModule
from mmpo.backbones import LoraSettings, QuantizationSettings, VisionLanguageBackbone
from mmpo.backbones.quantization import bitsandbytes_unavailable
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule

pytestmark = pytest.mark.skipif(bitsandbytes_unavailable() is not None, reason=str(bitsandbytes_unavailable()))


def _quantized_linear_names(model) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}


def _statistics(backbone, model, batch):
    with torch.no_grad():
        return backbone.statistics(model, batch)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_reference_is_the_quantized_base_and_only_the_adapter_trains(
    bits, tiny_llava, world, first_batch, tmp_path
):
    quantization = QuantizationSettings(bits=bits, compute_dtype="float32")
    base_backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4), quantization=quantization)
    base = base_backbone.load_pretrained().eval()  # the quantized model as loaded, no adapter
    quantized = _quantized_linear_names(base)
    want_kind = "Linear4bit" if bits == 4 else "Linear8bitLt"
    assert quantized and set(quantized.values()) == {want_kind}
    assert all("language_model" in n for n in quantized)  # vision tower, projector and LM head stay unquantized
    want = _statistics(base_backbone, base, first_batch)

    torch.manual_seed(0)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=lora, quantization=quantization)
    module = PreferenceModule(backbone, DPOLoss(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    module.configure_model()
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert (
        "4-bit base" in backbone.describe(module.policy)
        if bits == 4
        else "8-bit base" in backbone.describe(module.policy)
    )
    adapter_before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}

    def reference_is_base() -> None:
        module.policy.eval()
        _, _, reference = module.compute(first_batch)  # the module's default strategy: DisabledAdapter
        torch.testing.assert_close(reference.logps, want.logps, rtol=0, atol=0)
        module.policy.train()

    reference_is_base()
    dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 4})
    trainer = quiet_trainer(max_steps=3, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    losses = [float(v) for k, v in trainer.logged_metrics.items() if k.startswith("train/loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    moved = [
        n for n, p in module.policy.named_parameters() if p.requires_grad and not torch.equal(p, adapter_before[n])
    ]
    assert moved  # the adapter trained ...
    reference_is_base()  # ... and the reference is still the quantized base
    module.policy.eval()
    policy = _statistics(backbone, module.policy, first_batch)
    assert not torch.equal(policy.logps, want.logps)  # the policy left the reference


def test_quantization_needs_lora_and_refuses_a_frozen_copy(tiny_llava):
    with pytest.raises(ValueError, match="set backbone.lora"):
        VisionLanguageBackbone(str(tiny_llava), quantization=QuantizationSettings())
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4), quantization=QuantizationSettings())
    with pytest.raises(ValueError, match="frozen copy of a quantized model"):
        backbone.frozen_copy(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantizationSettings(bits=2)
    plain = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4)).fingerprint_settings()
    assert "quantization" not in plain  # unquantized caches keep their fingerprints
    assert backbone.fingerprint_settings()["quantization"]["bits"] == 4
