"""SparsePO's learned token masks: the mask network's maths, the loss with learned masks (hand values, the L1
terms' gradients, errors), the per-layer hidden states it reads, and training on a tiny LLaVA where the
network is built with the policy, trained by the optimizer and kept in checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.config import instantiate, loss_parser
from helpers.pairs import F64
from helpers.trainers import quiet_trainer

from mmpo.losses import ResponseStats, SparsePOLoss, sparse_po_loss
from mmpo.token_masks import TokenMaskNetwork


def _by_hand(model, hidden):
    """(N, R): LayerNorm shared by the layers, per layer Linear(H → 1) → ReLU, then ReLU(Σ_l w_l·s_l), in plain ops."""
    mixed = 0.0
    for layer in range(hidden.shape[1]):
        x = hidden[:, layer]
        normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        normed = normed * model.norm.weight + model.norm.bias
        s = torch.relu(normed @ model.layers[layer].weight[0] + model.layers[layer].bias[0])  # (N, R)
        mixed = mixed + model.mixer.weight[0, layer] * s
    return torch.relu(mixed).detach()


def test_the_network_computes_the_official_simple_all_form():
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 5, 4)  # (N, L, R, H)
    common = TokenMaskNetwork(num_layers=3, hidden_size=4, dropout=0.0)
    got = common(hidden)  # (N, R, 2)
    assert got.shape == (2, 5, 2) and (got >= 0).all()
    torch.testing.assert_close(got[..., 0], _by_hand(common.masks[0], hidden), atol=1e-6, rtol=1e-5)
    assert torch.equal(got[..., 0], got[..., 1])  # one common mask for both terms
    independent = TokenMaskNetwork(num_layers=3, hidden_size=4, independent=True, dropout=0.0)
    both = independent(hidden)
    for o in range(2):
        torch.testing.assert_close(both[..., o], _by_hand(independent.masks[o], hidden), atol=1e-6, rtol=1e-5)
    assert not torch.equal(both[..., 0], both[..., 1])
    with pytest.raises(ValueError, match=r"\(N, 3, R, 4\)"):
        common(torch.randn(2, 2, 5, 4))
    with pytest.raises(ValueError, match="dropout"):
        TokenMaskNetwork(3, 4, dropout=1.0)


def _inputs(masks: torch.Tensor):
    # one pair, T = 3: chosen has 3 tokens, rejected 2 (as in test_losses_token_level)
    mask = torch.tensor([[[1, 1, 1], [1, 1, 0]]], dtype=torch.bool)
    pol = torch.tensor([[[-1.0, -2.0, -0.5], [-1.5, -1.0, 0.0]]], dtype=F64)
    ref = torch.tensor([[[-1.5, -1.0, -1.0], [-1.0, -2.0, 0.0]]], dtype=F64)
    kl = torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.1, 0.0]]], dtype=F64)
    policy = ResponseStats(pol.sum(-1), mask.sum(-1).to(F64), pol, mask, token_kl=kl)
    reference = ResponseStats(ref.sum(-1), mask.sum(-1).to(F64), ref, mask, token_masks=masks)
    return policy, reference


def test_learned_masks_hand_value_with_l1_terms_and_their_gradients():
    m_u = torch.tensor([[[1.0, 0.5, 0.0], [2.0, 1.0, 9.0]]], dtype=F64)  # 9.0 sits past the rejected's end
    m_d = torch.tensor([[[0.0, 1.0, 1.0], [0.5, 0.0, 9.0]]], dtype=F64)
    masks = torch.stack([m_u, m_d], dim=-1).requires_grad_(True)  # (B, K, T, 2)
    policy, reference = _inputs(masks)
    loss = SparsePOLoss(beta=0.5, masks="learned", l1_reward=0.01, l1_kl=0.02, independent_masks=True)
    out = loss(policy, reference)
    # log-ratios chosen (0.5, −1, 0.5), rejected (−0.5, 1); KL chosen (0.1, 0.2, 0.3), rejected (0.4, 0.1)
    u_w, u_l = 0.5 - 0.5 + 0.0, -1.0 + 1.0
    d_w, d_l = -(0.2 + 0.3), -(0.2 + 0.0)
    l1 = 0.01 * (1.5 + 3.0) + 0.02 * (2.0 + 0.5)  # only the response tokens count
    assert out.losses.item() == pytest.approx(nls(0.5 * ((u_w - u_l) - (d_w - d_l))) + l1, rel=1e-12)
    assert out.metrics["mask/mean"].item() == pytest.approx((1.5 / 3 + 3.0 / 2) / 2)
    assert out.metrics["mask/kl_mean"].item() == pytest.approx((2.0 / 3 + 0.5 / 2) / 2)
    # the pure function agrees, given the masks cut to the responses
    cut = masks.detach() * reference.mask[..., None]
    ratios = (policy.token_logps - reference.token_logps) * policy.mask
    direct = sparse_po_loss(ratios, policy.token_kl, cut[..., 0], cut[..., 1], 0.5, 0.01, 0.02)
    torch.testing.assert_close(out.losses.detach(), direct)
    out.losses.sum().backward()
    grad = masks.grad
    assert grad[0, 1, 2].eq(0).all()  # nothing reaches the weight past the rejected's end
    # the chosen's first token has log-ratio 0.5 > 0: raising its reward weight lowers the DPO part by
    # more than its L1 weight raises it; the rejected's second has log-ratio +1: its weight should fall
    assert grad[0, 0, 0, 0] < 0 and grad[0, 1, 1, 0] > 0
    # the L1 terms add exactly λ_u and λ_d to the gradient of every response token's non-zero weights
    # (|m| has subgradient 0 at 0, where the ReLU of the network puts a pruned token)
    free = torch.stack([m_u, m_d], dim=-1).requires_grad_(True)
    SparsePOLoss(beta=0.5, masks="learned", independent_masks=True)(*_inputs(free)).losses.sum().backward()
    lam = torch.tensor([0.01, 0.02], dtype=F64) * reference.mask[..., None] * (free.detach() > 0)
    torch.testing.assert_close(grad - free.grad, lam.expand_as(grad))


def test_a_common_mask_pays_half_of_each_l1_weight():
    m = torch.tensor([[[1.0, 0.5, 0.0], [2.0, 1.0, 0.0]]], dtype=F64)
    policy, reference = _inputs(torch.stack([m, m], dim=-1))
    common = SparsePOLoss(beta=0.5, masks="learned", l1_reward=0.01, l1_kl=0.02)(policy, reference).losses
    free = SparsePOLoss(beta=0.5, masks="learned")(policy, reference).losses
    # the official code halves both weights when one mask serves both terms: (0.01 + 0.02) / 2 · ‖m‖₁
    torch.testing.assert_close(common - free, torch.tensor([0.015 * 4.5], dtype=F64))
    out = SparsePOLoss(beta=0.5, masks="learned")(policy, reference)
    assert "mask/kl_mean" not in out.metrics and out.metrics["mask/mean"].item() == pytest.approx((1.5 / 3 + 3 / 2) / 2)


def nls(x: float) -> float:
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def test_learned_masks_errors_and_yaml():
    policy, reference = _inputs(None)
    with pytest.raises(ValueError, match="token_masks on the reference"):
        SparsePOLoss(masks="learned")(policy, reference)
    with pytest.raises(ValueError, match="do not fit"):
        SparsePOLoss(masks="learned")(policy, _inputs(torch.ones(1, 2, 4, 2, dtype=F64))[1])
    with pytest.raises(ValueError, match="penalises learned masks only"):
        SparsePOLoss(l1_reward=0.1)
    with pytest.raises(ValueError, match="learns nothing"):
        SparsePOLoss(masks="learned", mask_reward=False, mask_kl=False)
    with pytest.raises(ValueError, match="'activation' or 'learned'"):
        SparsePOLoss(masks="attention")
    assert SparsePOLoss(masks="learned").learned_token_masks and not SparsePOLoss().learned_token_masks
    parser = loss_parser()
    args = {"masks": "learned", "l1_reward": 0.001, "l1_kl": 0.002}
    loss = instantiate(
        parser, parser.parse_object({"loss": {"class_path": "mmpo.losses.SparsePOLoss", "init_args": args}})
    )
    assert (loss.loss.masks, loss.loss.l1_reward, loss.loss.l1_kl) == ("learned", 0.001, 0.002)


def _module(tiny_llava, loss):
    from mmpo.backbones import LoraSettings, VisionLanguageBackbone
    from mmpo.module import PreferenceModule

    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    return PreferenceModule(backbone, loss, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))


def test_the_module_builds_the_network_and_the_statistics_carry_its_masks(tiny_llava, first_batch):
    torch.manual_seed(0)
    module = _module(tiny_llava, SparsePOLoss(masks="learned", l1_reward=0.01, l1_kl=0.01))
    module.configure_model()
    net = module.token_mask_network
    config = module.policy.config.text_config
    assert (net.num_layers, net.hidden_size) == (config.num_hidden_layers, config.hidden_size)
    module.policy.eval()
    net.eval()  # no dropout: exact comparisons
    out, policy, reference = module.compute(first_batch)
    masks = reference.token_masks  # (B, K, R, 2): the network on the reference's layers, 0 past each response's end
    assert masks.shape == (*policy.token_logps.shape, 2) and masks.requires_grad
    assert masks[~policy.mask.bool()].eq(0).all() and masks.sum() > 0
    with torch.no_grad(), module.backbone.adapters_disabled(module.policy):
        _, mask, _, _, layers = module.backbone.response_hidden(module.policy, first_batch, layers=True)
        want = net(layers) * mask[..., None]  # (N, R, 2) in row layout
    k = first_batch.group_size
    torch.testing.assert_close(masks.detach(), want.view(k, -1, *want.shape[1:]).transpose(0, 1))
    # at the start the adapter is the reference: the DPO part is ln 2 whatever the masks; the L1 terms of a
    # common mask add (λ_u + λ_d) / 2 · ‖m‖₁ over both responses
    l1 = 0.5 * (0.01 + 0.01) * masks[..., 0].sum((-2, -1))
    torch.testing.assert_close(out.losses, math.log(2.0) + l1.detach(), atol=1e-5, rtol=1e-5)
    out.losses.mean().backward()
    mixer = net.masks[0].mixer.weight
    assert mixer.grad is not None and mixer.grad.abs().sum() > 0  # the L1 terms reach the network
    # the per-layer hidden states the network reads end with the final one the KL is computed from
    batch = first_batch
    with torch.no_grad():
        picked, mask, _, _, layers = module.backbone.response_hidden(module.policy, batch, layers=True)
    assert layers.shape[1] == config.num_hidden_layers
    torch.testing.assert_close(layers[:, -1][mask], picked[mask])


@pytest.mark.slow
def test_a_fit_trains_the_network_and_its_weights_are_in_the_checkpoint(tiny_llava, world, tmp_path):
    from datamodules import ImagePreferenceDataModule

    torch.manual_seed(0)
    module = _module(tiny_llava, SparsePOLoss(masks="learned", l1_reward=0.01, l1_kl=0.01))
    data = ImagePreferenceDataModule(
        str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 2, "shuffle": False}
    )
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=str(tmp_path))
    module.configure_model()
    start = module.token_mask_network.masks[0].mixer.weight.detach().clone()
    trainer.fit(module, datamodule=data)
    net = module.token_mask_network
    assert not torch.equal(net.masks[0].mixer.weight.detach(), start)  # trained by the optimizer
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    names = {n for n in state if n.startswith("token_mask_network.")}
    assert names == {f"token_mask_network.{n}" for n, _ in net.named_parameters()}
    torch.testing.assert_close(state["token_mask_network.masks.0.mixer.weight"], net.masks[0].mixer.weight.detach())
