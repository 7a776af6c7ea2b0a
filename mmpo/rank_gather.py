"""Concatenating 1-D tensors of different lengths over the ranks of a distributed run."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["gather_variable"]


def gather_variable(values: Tensor, all_gather: Callable[[Tensor], Tensor]) -> Tensor:
    """Every rank's (N_r,) ``values`` concatenated in rank order, for lengths N_r that differ per rank.

    ``all_gather`` stacks a same-shaped tensor of every rank, (R, ...) (Lightning's
    ``LightningModule.all_gather``). Two collectives: the lengths, then the values padded to the
    longest. A rank with nothing to add passes an empty tensor; it still receives the others' values.
    The values travel as float64, so ranks whose tensors differ in dtype (an idle rank's empty tensor)
    still send the same number of bytes.

    Args:
        values: (N_r,) this rank's values.
        all_gather: the collective, called identically on every rank.

    Returns:
        (sum of N_r,) values, on ``values``' device and in its dtype.
    """
    n = torch.tensor([values.shape[0]], device=values.device)
    lengths = all_gather(n).reshape(-1).tolist()  # (R,)
    padded = torch.zeros(max(lengths), dtype=torch.float64, device=values.device)
    padded[: values.shape[0]] = values
    stacked = all_gather(padded).reshape(len(lengths), -1)  # (R, max N_r)
    return torch.cat([stacked[r, :k] for r, k in enumerate(lengths)]).to(values.dtype)
