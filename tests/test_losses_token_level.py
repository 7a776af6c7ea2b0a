"""TDPO1/TDPO2 and SparsePO: hand-computed values, the stop-gradient of TDPO2, stability, gradient directions,
activation masks, errors and YAML; then a few training steps of TDPO on a tiny LLaVA with the adapter reference,
whose per-token KL equals the one computed from the models' full logits, and the refusal of cached and no
reference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers.config import instantiate, loss_parser
from helpers.pairs import F64

from mmpo.losses import (
    DPOLoss,
    ResponseStats,
    SparsePOLoss,
    TDPOLoss,
    activation_masks,
    dpo_loss,
    sparse_po_loss,
    tdpo_loss,
)

REPO = Path(__file__).resolve().parents[1]


def nls(x: float) -> float:
    """−log σ(x) in plain math."""
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=grad)


# Two pairs: summed log-ratios (chosen, rejected) and SeqKL (chosen, rejected).
RC, RR = [0.5, -1.0], [-1.0, 0.5]
KC, KR = [0.2, 1.5], [0.7, 0.1]


# --------------------------------------------------------------------------- TDPO


def test_tdpo1_and_tdpo2_hand_values():
    beta, alpha = 0.1, 0.5
    tdpo1 = tdpo_loss(t(*RC), t(*RR), t(*KC), t(*KR), beta, alpha, "tdpo1")
    tdpo2 = tdpo_loss(t(*RC), t(*RR), t(*KC), t(*KR), beta, alpha, "tdpo2")
    # pair 0: Δ = 1.5, KL_l − KL_w = 0.5; pair 1: Δ = −1.5, KL_l − KL_w = −1.4
    assert tdpo1.tolist() == pytest.approx([nls(0.1 * (1.5 - 0.5)), nls(0.1 * (-1.5 + 1.4))], rel=1e-12)
    assert tdpo2.tolist() == pytest.approx([nls(0.1 * (1.5 - 0.25)), nls(0.1 * (-1.5 + 0.7))], rel=1e-12)


def test_tdpo2_stops_the_gradient_of_the_chosen_kl_and_lowers_the_rejected_one():
    def grads(variant):
        kc, kr = t(*KC, grad=True), t(*KR, grad=True)
        tdpo_loss(t(*RC), t(*RR), kc, kr, 0.1, 0.5, variant).sum().backward()
        return kc.grad, kr.grad

    kc2, kr2 = grads("tdpo2")
    assert kc2 is None  # sg[SeqKL_w]: not even in the graph
    assert kr2.gt(0).all()  # a larger rejected KL raises the loss: descent lowers it
    kc1, kr1 = grads("tdpo1")
    assert kc1.lt(0).all() and kr1.gt(0).all()  # TDPO1 rewards a larger chosen KL
    # by hand: d/dKL_l of −log σ(βz) with z = Δ − α(KL_l − KL_w) is βα·σ(−βz); z = 1.25 and −0.8
    sig = torch.sigmoid
    torch.testing.assert_close(kr2, 0.1 * 0.5 * sig(t(-0.125, 0.08)))
    torch.testing.assert_close(kr1, 0.1 * sig(t(-0.1, 0.01)))  # TDPO1: z = 1.0 and −0.1, no α


def test_tdpo_gradient_direction_on_the_log_ratios():
    rc, rr = t(*RC, grad=True), t(*RR, grad=True)
    tdpo_loss(rc, rr, t(*KC), t(*KR), 0.1).sum().backward()
    assert rc.grad.lt(0).all() and rr.grad.gt(0).all()


def test_tdpo_extreme_log_ratios_and_kl_stay_finite():
    big = 1e4
    rc, rr = t(big, -big, grad=True), t(-big, big, grad=True)
    kc, kr = t(big, 0.0, grad=True), t(0.0, big, grad=True)
    for variant in ("tdpo1", "tdpo2"):
        loss = tdpo_loss(rc, rr, kc, kr, 0.1, 0.5, variant)
        loss.sum().backward()
        grads = [x.grad for x in (rc, rr, kc, kr) if x.grad is not None]  # TDPO2: none reaches kc
        assert torch.isfinite(loss).all() and len(grads) == (4 if variant == "tdpo1" else 3)
        assert all(torch.isfinite(g).all() for g in grads)
        for x in (rc, rr, kc, kr):
            x.grad = None
    # pair 1 has margin β(−2e4 − 1e4) in TDPO1: the loss is its size, −log σ(z) ≈ −z
    assert tdpo_loss(rc, rr, kc, kr, 0.1, 0.5, "tdpo1")[1].item() == pytest.approx(0.1 * 3e4, rel=1e-9)


def test_tdpo2_with_alpha_zero_is_dpo():
    got = tdpo_loss(t(*RC), t(*RR), t(*KC), t(*KR), 0.3, alpha=0.0)
    torch.testing.assert_close(got, dpo_loss(t(*RC), t(*RR), 0.3))


def _stats(logps, token_kl=None, token_logps=None, mask=None, activation=None) -> ResponseStats:
    logps = torch.tensor(logps, dtype=F64)
    tokens = torch.ones_like(logps)
    return ResponseStats(
        logps, tokens, token_logps=token_logps, mask=mask, token_kl=token_kl, token_activation=activation
    )


def test_tdpo_loss_class_reads_the_summed_token_kl():
    # token KL (B, K, T) with zeros past each response's end: SeqKL = its sum
    kl = torch.tensor([[[0.1, 0.1, 0.0], [0.3, 0.4, 0.0]], [[1.0, 0.5, 0.0], [0.05, 0.05, 0.0]]], dtype=F64)
    policy = _stats([[-3.0, -5.0], [-4.0, -2.0]], token_kl=kl)
    reference = _stats([[-3.5, -4.0], [-3.0, -2.5]])
    loss = TDPOLoss(beta=0.1, alpha=0.5)
    out = loss(policy, reference)
    # log-ratios: pair 0 (0.5, −1.0), pair 1 (−1.0, 0.5); SeqKL: (0.2, 0.7), (1.5, 0.1)
    want = tdpo_loss(t(0.5, -1.0), t(-1.0, 0.5), t(0.2, 1.5), t(0.7, 0.1), 0.1, 0.5, "tdpo2")
    torch.testing.assert_close(out.losses, want)
    torch.testing.assert_close(out.rewards, 0.1 * torch.tensor([[0.5, -1.0], [-1.0, 0.5]], dtype=F64))
    torch.testing.assert_close(out.metrics["kl/chosen"], t(0.2, 1.5))
    torch.testing.assert_close(out.metrics["kl/rejected"], t(0.7, 0.1))
    tdpo1 = TDPOLoss(beta=0.1, variant="tdpo1")(policy, reference).losses
    torch.testing.assert_close(tdpo1, tdpo_loss(t(0.5, -1.0), t(-1.0, 0.5), t(0.2, 1.5), t(0.7, 0.1), 0.1, 0, "tdpo1"))


def test_token_kl_losses_refuse_statistics_without_the_kl():
    policy, reference = _sparse_inputs()
    policy = ResponseStats(policy.logps, policy.tokens, policy.token_logps, policy.mask)  # everything but the KL
    for loss in (TDPOLoss(), SparsePOLoss()):
        with pytest.raises(ValueError, match="per-token KL over the full vocabulary"):
            loss(policy, reference)


def test_tdpo_arguments_are_checked():
    with pytest.raises(ValueError, match="beta"):
        TDPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="alpha"):
        TDPOLoss(alpha=-1.0)
    with pytest.raises(ValueError, match="variant"):
        TDPOLoss(variant="tdpo3")
    with pytest.raises(ValueError, match="kl_chunk_size"):
        TDPOLoss(kl_chunk_size=0)
    with pytest.raises(ValueError, match="variant"):
        tdpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), 0.1, variant="x")


# --------------------------------------------------------------------------- SparsePO


def test_sparse_po_hand_values_with_l1_terms():
    # one pair, T = 2: chosen log-ratios (1, 2), rejected (−1, 0.5); KL chosen (0.1, 0.2), rejected (0.4, 0)
    lr = torch.tensor([[[1.0, 2.0], [-1.0, 0.5]]], dtype=F64)
    kl = torch.tensor([[[0.1, 0.2], [0.4, 0.0]]], dtype=F64)
    mu = torch.tensor([[[1.0, 0.5], [0.0, 1.0]]], dtype=F64)
    md = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]], dtype=F64)
    u_w, u_l = 1.0 + 1.0, 0.5
    d_w, d_l = -(0.05 + 0.1), -0.4
    want = nls(0.2 * ((u_w - u_l) - (d_w - d_l))) + 0.01 * (1.5 + 1.0) + 0.02 * (1.0 + 1.0)
    got = sparse_po_loss(lr, kl, mu, md, beta=0.2, l1_reward=0.01, l1_kl=0.02)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_sparse_po_with_masks_of_ones_is_tdpo1():
    lr = torch.tensor([[[1.0, 2.0], [-1.0, 0.5]], [[0.3, 0.0], [0.2, -0.7]]], dtype=F64)
    kl = torch.tensor([[[0.1, 0.2], [0.4, 0.0]], [[0.5, 0.0], [0.25, 0.25]]], dtype=F64)
    ones = torch.ones_like(lr)
    got = sparse_po_loss(lr, kl, ones, ones, beta=0.1)
    ratio, seq = lr.sum(-1), kl.sum(-1)
    torch.testing.assert_close(got, tdpo_loss(ratio[:, 0], ratio[:, 1], seq[:, 0], seq[:, 1], 0.1, variant="tdpo1"))


def test_activation_masks_rescale_each_response_to_unit_range():
    act = torch.tensor([[2.0, 4.0, 3.0, 99.0], [5.0, 7.0, 7.0, 7.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    got = activation_masks(act, mask)
    assert got[0].tolist() == [0.0, 1.0, 0.5, 0.0]  # padding gets 0 whatever its value
    assert got[1].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert got[2].tolist() == [1.0, 0.0, 0.0, 0.0]  # one token: no spread, weight 1
    assert got[3].tolist() == [0.0, 0.0, 0.0, 0.0]  # empty response


def test_activation_masks_equal_the_official_z_norm_then_min_max():
    g = torch.Generator().manual_seed(0)
    act = torch.randn(3, 6, generator=g, dtype=F64)
    mask = torch.arange(6)[None] < torch.tensor([6, 4, 2])[:, None]
    got = activation_masks(act, mask)
    for row, m in zip(range(3), mask, strict=True):
        a = act[row, m]
        z = (a - a.mean()) / (a.std() + 1e-12)
        want = (z - z.min()) / (z.max() - z.min())
        torch.testing.assert_close(got[row, m], want, rtol=1e-12, atol=1e-12)


def _sparse_inputs():
    # one pair, T = 3: chosen has 3 tokens, rejected 2
    mask = torch.tensor([[[1, 1, 1], [1, 1, 0]]], dtype=torch.bool)
    pol = torch.tensor([[[-1.0, -2.0, -0.5], [-1.5, -1.0, 0.0]]], dtype=F64)
    ref = torch.tensor([[[-1.5, -1.0, -1.0], [-1.0, -2.0, 0.0]]], dtype=F64)
    kl = torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.1, 0.0]]], dtype=F64)
    act = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 1.0, 0.0]]], dtype=F64)
    policy = ResponseStats(pol.sum(-1), mask.sum(-1).to(F64), pol, mask, token_kl=kl)
    reference = ResponseStats(ref.sum(-1), mask.sum(-1).to(F64), ref, mask, token_activation=act)
    return policy, reference


def test_sparse_po_class_hand_value_with_activation_masks():
    policy, reference = _sparse_inputs()
    out = SparsePOLoss(beta=0.5)(policy, reference)
    # masks: chosen (0, 1, 0.5), rejected (1, 0); log-ratios chosen (0.5, −1, 0.5), rejected (−0.5, 1)
    u_w, u_l = 0.0 - 1.0 + 0.25, -0.5
    d_w, d_l = -(0.2 + 0.15), -0.4
    assert out.losses.item() == pytest.approx(nls(0.5 * ((u_w - u_l) - (d_w - d_l))), rel=1e-12)
    torch.testing.assert_close(out.rewards, 0.5 * torch.tensor([[u_w, u_l]], dtype=F64))
    assert out.metrics["mask/mean"].item() == pytest.approx((1.5 / 3 + 1.0 / 2) / 2)
    # without masks it is TDPO1 on the summed statistics
    plain = SparsePOLoss(beta=0.5, mask_reward=False, mask_kl=False)(policy, reference).losses
    ratio, seq = policy.logps - reference.logps, policy.token_kl.sum(-1)
    torch.testing.assert_close(plain, tdpo_loss(ratio[:, 0], ratio[:, 1], seq[:, 0], seq[:, 1], 0.5, variant="tdpo1"))


def test_sparse_po_refuses_missing_activations_and_mismatched_layouts():
    policy, reference = _sparse_inputs()
    bare = ResponseStats(reference.logps, reference.tokens, reference.token_logps, reference.mask)
    with pytest.raises(ValueError, match="token_activation"):
        SparsePOLoss()(policy, bare)
    SparsePOLoss(mask_reward=False, mask_kl=False)(policy, bare)  # no masks: no activations needed
    short = ResponseStats(
        policy.logps, policy.tokens, policy.token_logps, policy.mask, token_kl=policy.token_kl[..., :2]
    )
    with pytest.raises(ValueError, match="one token layout"):
        SparsePOLoss()(short, reference)


# --------------------------------------------------------------------------- YAML


@pytest.mark.parametrize(
    ("cls", "init_args"),
    [
        (TDPOLoss, {"beta": 0.2, "alpha": 0.3, "variant": "tdpo1", "kl_chunk_size": 64}),
        (SparsePOLoss, {"beta": 0.8, "mask_reward": True, "mask_kl": False, "kl_chunk_size": 32}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_token_level_losses_selectable_by_class_path(cls, init_args):
    parser = loss_parser()
    cfg = parser.parse_object({"loss": {"class_path": f"mmpo.losses.{cls.__name__}", "init_args": init_args}})
    loss = instantiate(parser, cfg).loss
    assert type(loss) is cls and loss.requires_token_kl
    for name, value in init_args.items():
        assert getattr(loss, name) == value


def test_tdpo2_config_overrides_the_loss_of_a_lora_config():
    text = (REPO / "configs" / "losses" / "tdpo2_lora.yaml").read_text()
    config = yaml.safe_load(text)
    parser = loss_parser()
    loss = instantiate(parser, parser.parse_object({"loss": config["model"]["init_args"]["loss"]})).loss
    assert type(loss) is TDPOLoss and (loss.variant, loss.alpha, loss.beta) == ("tdpo2", 0.5, 0.1)
    assert config["model"]["init_args"]["reference"] == "adapter"
    assert "mmpo fit --config configs/llava15_7b_dpo_lora.yaml --config configs/losses/tdpo2_lora.yaml" in text


# --------------------------------------------------------------------------- tiny LLaVA


def _module(tiny_llava, loss, **kw):
    from mmpo.backbones import LoraSettings, VisionLanguageBackbone
    from mmpo.module import PreferenceModule

    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    module = PreferenceModule(backbone, loss, **kw)
    module.configure_model()
    return module


def _dense_kl_from_logits(module, batch):
    """(N, R) KL from the full (N, T, V) logits of the adapter-disabled and the adapted model, in float64."""
    from mmpo.token_kl import response_columns, token_kl

    model = module.policy
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.row_media()}
    with torch.no_grad():
        policy_logits = model(**inputs).logits.double()  # (N, T, V)
        with module.backbone.adapters_disabled(model):
            reference_logits = model(**inputs).logits.double()
    prompts, counts = batch.host_lengths()
    predicting = [p - 1 for p in prompts]  # the output at column c predicts token c + 1
    per_token = token_kl(reference_logits, policy_logits)  # (N, T)
    return response_columns(per_token, predicting, counts)[0]


def test_tdpo_trains_a_tiny_llava_with_the_adapter_reference(tiny_llava, first_batch):
    torch.manual_seed(0)
    batch = first_batch
    module = _module(tiny_llava, TDPOLoss(beta=0.1, alpha=0.5, kl_chunk_size=7))
    assert module.reference_mode == "adapter"
    module.policy.eval()  # no dropout: exact comparisons
    out, policy, reference = module.compute(batch)
    # a fresh adapter is the reference: zero KL, zero rewards, loss ln 2
    assert policy.token_kl.abs().max() < 1e-6
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, math.log(2.0)), atol=1e-6, rtol=0)
    # the statistics are those of the usual (shared-prefix) pass, in response-position layout
    usual = module.backbone.statistics(module.policy, batch)
    torch.testing.assert_close(policy.logps, usual.logps, atol=1e-4, rtol=1e-5)
    assert policy.token_kl.shape == policy.token_logps.shape == reference.token_activation.shape

    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        out, policy, _ = module.compute(batch)
        opt.zero_grad()
        out.losses.mean().backward()
        opt.step()
    out, policy, _ = module.compute(batch)
    assert torch.isfinite(out.losses).all() and out.losses.mean() < math.log(2.0)
    assert (out.chosen_rewards - out.rejected_rewards).mean() > 0
    kl = policy.token_kl
    assert kl.sum() > 0 and kl[~policy.mask.bool()].eq(0).all()
    # the chunked KL from hidden states equals the KL of the models' full logits
    k, b = batch.group_size, batch.num_groups
    dense = _dense_kl_from_logits(module, batch).view(k, b, -1).transpose(0, 1)
    torch.testing.assert_close(kl.detach().double(), dense, atol=2e-5, rtol=1e-4)


def test_token_kl_losses_refuse_cached_and_no_reference(tiny_llava):
    from mmpo.backbones import LoraSettings, VisionLanguageBackbone
    from mmpo.module import PreferenceModule

    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8))
    with pytest.raises(ValueError, match="cached log-probs do not hold; use reference adapter"):
        PreferenceModule(backbone, TDPOLoss(), reference="cached")
    with pytest.raises(ValueError, match="reference 'none' runs no reference"):
        PreferenceModule(backbone, SparsePOLoss(), reference="none")
    assert PreferenceModule(backbone, DPOLoss(), reference="cached").reference_mode == "cached"


def test_sparse_po_with_a_frozen_copy_reference_and_a_trainable_head(tiny_llava, first_batch):
    # full fine-tuning: the reference is a frozen copy, the policy's LM head trains (the checkpointed KL path)
    from mmpo.backbones import VisionLanguageBackbone
    from mmpo.module import PreferenceModule

    module = PreferenceModule(VisionLanguageBackbone(str(tiny_llava)), SparsePOLoss(beta=0.1, kl_chunk_size=5))
    module.configure_model()
    assert module.reference_mode == "copy"
    module.policy.eval()
    out, policy, reference = module.compute(first_batch)
    assert policy.token_kl.abs().max() < 1e-6  # the copy is the policy as built
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, math.log(2.0)), atol=1e-6, rtol=0)
    weights = activation_masks(reference.token_activation, reference.mask)
    assert weights.max() == 1.0 and weights[~reference.mask.bool()].eq(0).all()
    with torch.no_grad():  # move the policy's head away from the copy's: a non-zero KL with a gradient into it
        module.policy.get_output_embeddings().weight.mul_(1.5)
    out, policy, _ = module.compute(first_batch)
    out.losses.mean().backward()
    head = module.policy.get_output_embeddings().weight
    assert policy.token_kl.sum() > 0 and head.grad is not None and torch.isfinite(head.grad).all()
    assert head.grad.abs().sum() > 0
