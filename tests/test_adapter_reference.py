"""The disabled-adapter reference is the base model, also when LoRA trains modules in full (``modules_to_save``)."""

import functools

import pytest
import torch
from helpers.trainers import quiet_trainer
from peft.utils import ModulesToSaveWrapper

from datamodules import ImagePreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule
from mmpo.reference import CachedReference, DisabledAdapter

PROJECTOR = "multi_modal_projector"  # LLaVA's vision-to-language projector, the module users train in full


@pytest.fixture(scope="module")
def batch(first_batch):
    return first_batch


def _statistics(backbone, model, batch):
    with torch.no_grad():
        return backbone.statistics(model, batch)


def test_disabled_adapter_reference_is_the_base_model_with_a_trained_projector(world, tiny_llava, batch, tmp_path):
    base_backbone = VisionLanguageBackbone(str(tiny_llava))
    base = base_backbone.build().eval()  # the model as loaded, before peft wraps it
    want = _statistics(base_backbone, base, batch)

    torch.manual_seed(0)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, modules_to_save=[PROJECTOR])
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-2)  # large: a visibly trained projector
    module = PreferenceModule(VisionLanguageBackbone(str(tiny_llava), lora=lora), DPOLoss(), optimizer=optimizer)
    module.configure_model()
    wrappers = [m for n, m in module.policy.named_modules() if n.endswith(PROJECTOR)]
    assert len(wrappers) == 1 and isinstance(wrappers[0], ModulesToSaveWrapper)
    wrapper = wrappers[0]
    assert not module.backbone.media_shareable(module.policy)  # the projector trains: no shared image features

    def check_reference_is_base() -> None:
        module.policy.eval()
        policy_before = _statistics(module.backbone, module.policy, batch)
        _, _, reference = module.compute(batch)  # the strategy the module trains with: DisabledAdapter
        torch.testing.assert_close(reference.token_logps, want.token_logps, rtol=0, atol=0)
        torch.testing.assert_close(reference.logps, want.logps, rtol=0, atol=0)
        direct = DisabledAdapter().statistics(module, batch, "train")
        torch.testing.assert_close(direct.logps, want.logps, rtol=0, atol=0)
        policy_after = _statistics(module.backbone, module.policy, batch)  # the adapter is back on
        torch.testing.assert_close(policy_after.token_logps, policy_before.token_logps, rtol=0, atol=0)
        module.policy.train()

    check_reference_is_base()  # before training: the projector copy and the (zero-B) adapter are the base model

    dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 4})
    trainer = quiet_trainer(max_steps=3, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)

    trained, original = wrapper.modules_to_save["default"], wrapper.original_module
    moved = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), original.parameters(), strict=True))
    assert moved > 1e-3  # the projector copy trained; the original stayed as loaded
    base_projector = next(m for n, m in base.named_modules() if n.endswith(PROJECTOR))
    for p, q in zip(original.parameters(), base_projector.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert max(p.abs().max().item() for n, p in module.policy.named_parameters() if "lora_B" in n) > 0
    policy = _statistics(module.backbone, module.policy.eval(), batch)
    assert (policy.logps - want.logps).abs().max() > 1e-3  # the policy is no longer the base model

    check_reference_is_base()

    # the cached reference computes its file with the same disabled-adapter pass (here after training)
    cached = CachedReference(str(tmp_path / "cache"))
    cached.prepare(module, ("train",))
    assert len(list((tmp_path / "cache").glob("train-*.safetensors"))) == 1
    from_cache = cached.statistics(module, batch, "train")
    torch.testing.assert_close(from_cache.token_logps, want.token_logps, rtol=0, atol=0)
    torch.testing.assert_close(from_cache.logps, want.logps, rtol=1e-6, atol=1e-6)
