"""ORPO and triple-preference TPO against TRL's own code on the same tensors (skipped without TRL).

Both TRL functions are methods of a trainer; they are called unbound on a stub that carries only the
attributes they read, so no model, dataset or accelerator is built.
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mmpo.losses import ORPOLoss, PairLogps, ResponseStats, TriplePreferenceLoss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def test_orpo_matches_trl_odds_ratio_loss():
    """mmpo's odds-ratio term equals TRL's ``ORPOTrainer.odds_ratio_loss`` (TRL ≥ 1.16, trl.experimental.orpo).

    TRL returns β·log σ(log odds_w − log odds_l) and trains on ``nll − mean(that)``; mmpo's per-pair loss is
    ``nll_w − λ·log σ(…)`` with λ = TRL's β. TRL's NLL is a cross-entropy over prompt and response tokens of
    the whole batch, computed from logits inside the trainer, so only the odds-ratio term, the rewards and the
    logged log-odds can be compared on statistics; the NLL part is checked to be the per-token mean NLL.
    """
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    lam = 0.25
    chosen = torch.tensor([-3.0, -5.0, -0.01, -40.0])
    rejected = torch.tensor([-4.0, -2.0, -30.0, -0.2])
    tokens_c = torch.tensor([2.0, 4.0, 1.0, 8.0])
    tokens_r = torch.tensor([5.0, 1.0, 3.0, 2.0])
    mean_c, mean_r = chosen / tokens_c, rejected / tokens_r
    stub = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    trl_terms, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = orpo.ORPOTrainer.odds_ratio_loss(
        stub, mean_c, mean_r
    )
    ours = ORPOLoss(lam=lam)(PairLogps(chosen, rejected, tokens_c, tokens_r), None)
    torch.testing.assert_close(ours.losses - ours.metrics["nll_loss"], -trl_terms)
    torch.testing.assert_close(ours.metrics["nll_loss"], -mean_c)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected)
    torch.testing.assert_close(ours.metrics["log_odds_ratio"].mean(), trl_ratio)
    torch.testing.assert_close(ours.metrics["log_odds_chosen"].mean(), trl_log_odds)


def _trl_tpo_stub(loss_type: str, beta: float, alpha: float, gamma: float) -> SimpleNamespace:
    identity = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    return SimpleNamespace(
        model=SimpleNamespace(training=False),
        loss_type=loss_type,
        beta=beta,
        label_smoothing=0.0,
        tpo_alpha=alpha,
        tpo_l_gamma=gamma,
        accelerator=identity,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )


@pytest.mark.parametrize(("variant", "loss_type"), [("tpo", "sigmoid"), ("tpo-l", "tpo-l")])
def test_triple_preference_matches_trl_tpo_trainer(variant, loss_type):
    """``TriplePreferenceLoss`` equals TRL's ``TPOTrainer._compute_loss`` on the same logits.

    TRL lays a batch out as [chosen, rejected, gold] rows and averages the gold NLL over all gold tokens of the
    batch; mmpo averages per gold response, then over the batch, so the gold responses here share one length
    (chosen and rejected lengths differ, which TPO-L's per-token means must handle).
    """
    tpo = pytest.importorskip("trl.experimental.tpo.tpo_trainer")
    beta, alpha, gamma = 0.5, 0.7, 0.3
    b, length, vocab = 2, 7, 11
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3 * b, length, vocab, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, (3 * b, length), generator=gen)
    completion = torch.zeros(3 * b, length, dtype=torch.long)
    starts = [2, 4, 1, 5, 3, 3]  # chosen rows 0–1, rejected rows 2–3, gold rows 4–5 (both 4 tokens)
    for row, start in enumerate(starts):
        completion[row, start:] = 1
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion}

    def model(**kwargs):
        return SimpleNamespace(logits=logits)

    trl_loss = tpo.TPOTrainer._compute_loss(_trl_tpo_stub(loss_type, beta, alpha, gamma), model, inputs, False)

    # The same statistics, computed here: token t + 1 scored by the logits at t, on completion tokens.
    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion[:, 1:].to(torch.float64)
    summed, counts = (token_logps * mask).sum(-1), mask.sum(-1)  # (3B,) in TRL's row order
    order = [2, 0, 1]  # mmpo's groups: gold, chosen, rejected
    logps = summed.view(3, b)[order].t()
    tokens = counts.view(3, b)[order].t()
    assert (tokens[:, 0] == tokens[0, 0]).all()
    ours = TriplePreferenceLoss(beta=beta, alpha=alpha, variant=variant, gamma=gamma)(
        ResponseStats(logps, tokens), None
    )
    torch.testing.assert_close(ours.losses.mean(), trl_loss.to(torch.float64), rtol=1e-10, atol=1e-12)
