"""LCPO: preference losses that estimate how often the labels are wrong, and down-weight the doubtful pairs.

Latent Collective Preference Optimization treats "this pair's label is correct" as a latent variable and
fits it by expectation-maximisation next to the policy. With the base loss's preference probability
p = σ(h) (h the base loss's margin) and η the estimated share of correct labels:

- E-step (no gradient): w = p·η / (p·η + (1 − p)·(1 − η)) = σ(h + logit η), the posterior that the
  label is correct;
- M-step: the soft-label loss −[w · log σ(h) + (1 − w) · log σ(−h)];
- η moves towards the batch's mean posterior: η ← (1 − rate)·η + rate·mean(w) (training steps only,
  over every rank's pairs), and is checkpointed.

The paper's abstract states the EM framework and its use on DPO, IPO, SimPO and CPO; the update of η
as a running mean (η₀ = 0.9, rate 0.1) comes from a detailed summary, not the paper's code, so both
are parameters. The margins implemented are DPO's (β·Δ of summed log-ratios) and SimPO's
(β·Δ of mean token log-probs − γ), whose preference probability is the sigmoid of the margin.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive, check_range, mean_token_logps

__all__ = ["LCPOLoss", "lcpo_loss", "lcpo_posterior"]


def lcpo_posterior(margin: Tensor, eta: float | Tensor) -> Tensor:
    """The E-step: the posterior that each pair's label is correct, σ(h + logit η), detached.

    Args:
        margin: (B,) the base loss's margin h (its preference probability is σ(h)).
        eta: prior probability η ∈ (0, 1) that a label is correct (a number or a 0-dim tensor).

    Returns:
        (B,) posteriors w in [0, 1]; computed in logit space, so margins of ±1e4 give 0 or 1, never NaN.
    """
    eta = torch.as_tensor(eta, dtype=torch.float64, device=margin.device)
    return torch.sigmoid(margin.detach() + torch.logit(eta).to(margin.dtype))


def lcpo_loss(margin: Tensor, posterior: Tensor) -> Tensor:
    """The M-step: ``−[w · log σ(h) + (1 − w) · log σ(−h)]`` per pair (Eq. of LCPO's weighted objective).

    Args:
        margin: (B,) the base loss's margin h, carrying the gradient.
        posterior: (B,) w, the probability that the label is correct (no gradient flows into it).

    Returns:
        (B,) per-pair loss.
    """
    w = posterior.detach().to(margin.dtype)
    return -(w * F.logsigmoid(margin) + (1.0 - w) * F.logsigmoid(-margin))


class LCPOLoss(PreferenceLoss):
    """LCPO on top of DPO or SimPO: label-noise-aware soft labels fitted by EM, η kept across steps.

    Rewards are the base loss's (β·logratio for DPO, β·mean token log-prob for SimPO). Metrics:
    ``lcpo/eta`` (the current estimate of the share of correct labels) and ``lcpo/posterior`` (the
    batch's mean w). Under several ranks η is updated from every rank's posteriors, so it stays the same
    on each.

    Args:
        base: the base loss whose margin is re-weighted: ``dpo`` (needs the reference) or ``simpo``
            (reference-free).
        beta: the base loss's β > 0 (DPO's 0.1; SimPO's 2.0).
        gamma: SimPO's target margin γ ≥ 0 (ignored for DPO).
        eta_init: η₀, the initial share of correct labels, in (0, 1) ([unconfirmed] 0.9).
        eta_rate: how far η moves towards the batch's mean posterior per training step, in [0, 1]
            ([unconfirmed] 0.1; 0 keeps η fixed at η₀).
    """

    stateful = True
    gathers_per_call = 1

    def __init__(
        self,
        base: Literal["dpo", "simpo"] = "dpo",
        beta: float = 0.1,
        gamma: float = 0.0,
        eta_init: float = 0.9,
        eta_rate: float = 0.1,
    ) -> None:
        if base not in ("dpo", "simpo"):
            raise ValueError(f"base must be 'dpo' or 'simpo', got {base!r}")
        check_positive("beta", beta)
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        if not 0.0 < eta_init < 1.0:
            raise ValueError(f"eta_init must be in (0, 1), got {eta_init!r}")
        check_range("eta_rate", eta_rate, 0.0, 1.0)
        self.base, self.beta, self.gamma = base, beta, gamma
        self.eta_init, self.eta_rate = eta_init, eta_rate
        self._eta: Tensor = torch.tensor(eta_init, dtype=torch.float64)  # on the statistics' device once used

    @property
    def eta(self) -> float:
        """The current estimate of the share of correct labels (reading it waits for the device)."""
        return float(self._eta)

    @property
    def requires_reference(self) -> bool:
        return self.base == "dpo"

    def _margin_and_rewards(self, policy: ResponseStats, reference: ResponseStats | None) -> tuple[Tensor, Tensor]:
        if self.base == "dpo":
            rewards = self.beta * (policy.logps[:, :2] - reference.logps[:, :2])  # (B, 2)
            return rewards[:, 0] - rewards[:, 1], rewards
        mean = mean_token_logps(policy.logps[:, :2], policy.tokens[:, :2])  # (B, 2)
        rewards = self.beta * mean
        return rewards[:, 0] - rewards[:, 1] - self.gamma, rewards

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        margin, rewards = self._margin_and_rewards(policy, reference)
        eta = self._eta = self._eta.to(margin.device)  # kept on the device: no read-back per step
        posterior = lcpo_posterior(margin, eta)
        losses = lcpo_loss(margin, posterior)
        self._update(posterior.double())
        metrics = {"lcpo/eta": eta, "lcpo/posterior": posterior.mean()}
        return LossOutput(losses, rewards, metrics)

    def _update(self, posterior: Tensor) -> None:
        everyone = self.gather(posterior)  # a collective: every call on every rank makes it (see idle)
        if self.training and everyone.numel():
            moved = (1.0 - self.eta_rate) * self._eta.to(everyone.device) + self.eta_rate * everyone.mean()
            # keep η inside (0, 1): logit η must stay finite for the next E-step
            self._eta = moved.clamp(1e-6, 1.0 - 1e-6)

    def idle(self, device: torch.device | str) -> None:
        self._update(torch.empty(0, dtype=torch.float64, device=device))

    def state_dict(self) -> dict[str, Any]:
        return {"eta": self.eta}  # a plain number: checkpoints load on any device

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"eta"}:
            raise ValueError(f"LCPOLoss state must hold 'eta', got {sorted(state)}")
        self._eta = torch.tensor(float(state["eta"]), dtype=torch.float64)
