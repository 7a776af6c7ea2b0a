"""Refreshing the reference to the policy: the reference then computes as the policy did, and stays put."""

import pytest
import torch

from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import DPOLoss, SimPOLoss
from mmpo.module import PreferenceModule
from mmpo.reference import SeparateCheckpoint
from mmpo.reference.adapter_snapshot import SNAPSHOT_ADAPTER
from mmpo.reference.refresh import check_refreshable, policy_weights, reference_weights, refresh_reference


def _module(tiny_llava, reference, lora: LoraSettings | None = None) -> PreferenceModule:
    torch.manual_seed(0)
    if lora is None:
        lora = LoraSettings(r=4, alpha=8, dropout=0.1, modules_to_save=["multi_modal_projector"])
    if reference == "checkpoint":
        reference = SeparateCheckpoint(str(tiny_llava))
    module = PreferenceModule(
        VisionLanguageBackbone(str(tiny_llava), lora=lora), DPOLoss(beta=0.1), reference=reference
    )
    module.configure_model()
    return module


def _train_a_little(module: PreferenceModule, seed: int) -> None:
    """Move every trainable weight (LoRA B starts at zero, so a fresh adapter is the base model)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy_weights(module).values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _policy_logps(module: PreferenceModule, batch) -> torch.Tensor:
    module.policy.eval()  # no LoRA dropout: the reference pass has none
    try:
        with torch.no_grad():
            return module.backbone.statistics(module.policy, batch).logps
    finally:
        module.policy.train()


def _reference_logps(module: PreferenceModule, batch) -> torch.Tensor:
    return module.reference.statistics(module, batch, "train").logps  # (B, K)


@pytest.mark.parametrize("reference", ["adapter", "copy", "checkpoint"])
def test_after_a_refresh_the_reference_is_the_policy_and_stays_frozen(tiny_llava, first_batch, reference):
    module = _module(tiny_llava, reference)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    _train_a_little(module, seed=1)
    before = _reference_logps(module, first_batch)
    at_refresh = _policy_logps(module, first_batch)
    assert (before - at_refresh).abs().max() > 1e-3  # the weights moved: the base model no longer matches

    refresh_reference(module)
    refreshed = _reference_logps(module, first_batch)
    torch.testing.assert_close(refreshed, at_refresh, atol=1e-5, rtol=0)
    torch.testing.assert_close(_reference_logps(module, first_batch), refreshed, atol=0, rtol=0)  # no dropout
    assert {n for n, p in module.named_parameters() if p.requires_grad} == trainable  # nothing new trains

    # a real optimizer step moves the policy, not the reference
    optimizer = module.configure_optimizers()
    frozen = reference_weights(module)
    module.policy.train()
    out, _, _ = module.compute(first_batch)
    out.losses.mean().backward()
    optimizer.step()
    _train_a_little(module, seed=2)
    moved = _policy_logps(module, first_batch)
    assert (moved - at_refresh).abs().max() > 1e-3
    torch.testing.assert_close(_reference_logps(module, first_batch), refreshed, atol=0, rtol=0)
    after = reference_weights(module)
    assert after.keys() == frozen.keys() and all(torch.equal(after[n], frozen[n]) for n in frozen)

    refresh_reference(module)  # a second refresh follows the policy again
    torch.testing.assert_close(_reference_logps(module, first_batch), moved, atol=1e-5, rtol=0)


def test_the_adapter_snapshot_is_a_second_frozen_adapter_left_out_of_the_trainable_set(tiny_llava):
    module = _module(tiny_llava, "adapter")
    _train_a_little(module, seed=1)
    refresh_reference(module)
    snapshot = {n: p for n, p in module.policy.named_parameters() if f".{SNAPSHOT_ADAPTER}." in n}
    trained = policy_weights(module)
    assert len(snapshot) == len(trained) and not any(p.requires_grad for p in snapshot.values())
    assert module.policy.active_adapter == "default" and module.reference.snapshot
    # the optimizer sees exactly the trained adapter
    (group,) = module.configure_optimizers().param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in trained.values()}


@pytest.mark.parametrize("reference", ["adapter", "copy"])
def test_reference_weights_rebuild_the_reference_in_a_new_process(tiny_llava, first_batch, reference):
    # what a checkpoint carries: the trainable weights at the refresh; a resumed run rebuilds the reference
    old = _module(tiny_llava, reference)
    _train_a_little(old, seed=1)
    refresh_reference(old)
    saved = {n: t.clone() for n, t in reference_weights(old).items()}
    want = _reference_logps(old, first_batch)
    _train_a_little(old, seed=3)  # the policy trains on after the refresh

    new = _module(tiny_llava, reference)  # as built: the reference is the base model
    assert (_reference_logps(new, first_batch) - want).abs().max() > 1e-3
    refresh_reference(new, saved)
    torch.testing.assert_close(_reference_logps(new, first_batch), want, atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="missing"):
        refresh_reference(new, dict(list(saved.items())[1:]))


def test_references_that_cannot_follow_the_policy_are_refused(tiny_llava):
    cached = _module(tiny_llava, "cached")
    with pytest.raises(ValueError, match="'cached' holds log-probs computed once"):
        refresh_reference(cached)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    free = PreferenceModule(VisionLanguageBackbone(str(tiny_llava), lora=lora), SimPOLoss())
    with pytest.raises(ValueError, match="uses no reference model"):
        check_refreshable(free)
    adapter = _module(tiny_llava, "adapter")
    adapter.candidates = object()  # any candidate selection scores with the adapter-disabled model
    with pytest.raises(ValueError, match="candidate selection"):
        check_refreshable(adapter)


def test_a_weight_trained_outside_the_adapter_cannot_go_into_an_adapter_snapshot(tiny_llava):
    module = _module(tiny_llava, "adapter", LoraSettings(r=4, alpha=8, dropout=0.0))
    projector = next(p for n, p in module.policy.named_parameters() if "multi_modal_projector" in n)
    projector.requires_grad_(True)  # trained in full beside the adapter, not through modules_to_save
    with pytest.raises(ValueError, match="not inside adapter 'default'"):
        refresh_reference(module)


def test_a_diffusion_denoiser_trained_in_full_refreshes_its_frozen_copy(tmp_path):
    pytest.importorskip("diffusers")
    from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs
    from datamodules.worlds.shapes import vocabulary
    from mmpo.backbones import DiffusionBackbone
    from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS
    from mmpo.tiny.diffusion import build_tiny_sd

    path = build_tiny_sd(tmp_path / "sd15", vocabulary())
    write_diffusion_pairs(tmp_path / "pairs", n=4, seed=0, image_size=32)
    dm = DiffusionPreferenceDataModule(
        train_file=str(tmp_path / "pairs" / "train.jsonl"), resolution=32, loader={"batch_size": 4, "shuffle": False}
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = PreferenceModule(DiffusionBackbone(str(path)), DPOLoss(beta=100.0), reference="copy")
    module.configure_model()
    _train_a_little(module, seed=1)
    at_refresh = _policy_logps(module, batch)
    assert (_reference_logps(module, batch) - at_refresh).abs().max() > 1e-4
    refresh_reference(module)
    torch.testing.assert_close(_reference_logps(module, batch), at_refresh, atol=1e-6, rtol=0)

    # diffusers' adapters are not a peft model: a snapshot adapter cannot be added, and that is said at once
    lora = LoraSettings(r=4, alpha=4, dropout=0.0, target_modules=DIFFUSION_LORA_TARGETS)
    adapter = PreferenceModule(DiffusionBackbone(str(path), lora=lora), DPOLoss(beta=100.0), reference="adapter")
    adapter.configure_model()
    with pytest.raises(ValueError, match="needs a peft model"):
        check_refreshable(adapter)
