"""Two hand-picked preference pairs shared by the loss tests.

logratio_chosen = [0.5, -1.0], logratio_rejected = [-1.0, 0.5], so Δ = [1.5, -1.5]. Token counts:
chosen [2, 4], rejected [5, 1].
"""

from __future__ import annotations

import torch

from mmpo.losses import PairLogps

F64 = torch.float64
LC, LR = [0.5, -1.0], [-1.0, 0.5]
CT, RT = [2.0, 4.0], [5.0, 1.0]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def policy_pair() -> PairLogps:
    return PairLogps(t(-3.0, -5.0), t(-4.0, -2.0), t(*CT), t(*RT))


def reference_pair() -> PairLogps:
    return PairLogps(t(-3.5, -4.0), t(-3.0, -2.5), t(*CT), t(*RT))
