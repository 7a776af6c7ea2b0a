"""Checks shared by the tests that compare the shared-prefix forward with the naive one."""

from __future__ import annotations

import torch

from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule


def comparison_module(model_dir, lora: bool, loss=None, **backbone_kw) -> PreferenceModule:
    """A DPO module in eval mode, seeded so that two of them start identical.

    With ``lora``, an r=4 adapter whose B matrices are drawn non-zero (a trained-looking adapter, the
    same in every module built this way). ``loss`` defaults to ``DPOLoss(beta=0.1)``.
    """
    torch.manual_seed(0)
    lora_settings = LoraSettings(r=4, alpha=8, dropout=0.0) if lora else None
    module = PreferenceModule(
        VisionLanguageBackbone(str(model_dir), lora=lora_settings, **backbone_kw), loss or DPOLoss(beta=0.1)
    )
    module.configure_model()
    if lora:
        with torch.no_grad():
            for n, p in module.policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    module.policy.eval()
    return module


def assert_same_logps_losses_and_gradients(shared, naive, batch) -> dict[str, torch.Tensor]:
    """Run both modules on ``batch`` and compare log-probs, losses and every parameter's gradient.

    Returns the shared module's gradients by parameter name (at least one).
    """
    out_s, pol_s, ref_s = shared.compute(batch)
    out_n, pol_n, ref_n = naive.compute(batch)
    assert pol_s.token_logps.shape[:2] == (batch.num_groups, batch.group_size)
    torch.testing.assert_close(pol_s.token_logps, pol_n.token_logps, atol=2e-5, rtol=1e-5)  # (B, K, T)
    if ref_n is not None:
        torch.testing.assert_close(ref_s.logps, ref_n.logps, atol=5e-5, rtol=1e-5)  # (B, K)
    torch.testing.assert_close(out_s.losses, out_n.losses, atol=1e-6, rtol=1e-5)
    out_s.losses.mean().backward()
    out_n.losses.mean().backward()
    grads_s = {n: p.grad for n, p in shared.named_parameters() if p.grad is not None}
    grads_n = {n: p.grad for n, p in naive.named_parameters() if p.grad is not None}
    assert grads_s.keys() == grads_n.keys() and len(grads_s) > 0
    for n, g in grads_s.items():
        torch.testing.assert_close(g, grads_n[n], atol=1e-6, rtol=1e-4, msg=n)
    return grads_s


def training_comparison_module(model_dir, lora: bool, loss=None, **backbone_kw) -> PreferenceModule:
    """:func:`comparison_module` with its policy in training mode, where activation checkpointing acts.

    The tiny models and the r=4 adapter have no dropout, so training mode computes what eval mode does.
    """
    module = comparison_module(model_dir, lora, loss, **backbone_kw)
    module.policy.train()
    return module
