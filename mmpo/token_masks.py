"""SparsePO's learned token masks: a small network over the reference's per-layer hidden states.

Christopoulou et al., "SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks"
(2024). Besides masks read from activations, SparsePO learns them. The form below is the official
code's default mask model (``simple_all``): for every response token, each decoder layer's output in the
reference's pass (the ``hidden_states`` after the embeddings) at the position that predicts the token goes
through one LayerNorm shared by all layers, then that layer's Linear(H → 1) → ReLU → dropout; a
Linear(L → 1, no bias) → ReLU → dropout mixes the layers into one weight ≥ 0 per token. By default one
such network gives a common mask for the reward and the KL terms; ``independent`` learns one for each.
The L1 norms of the masks join the loss (:func:`mmpo.losses.sparse_po_loss`). Weights start at PyTorch's
default initialisation, as in the official code; the inputs are read without a gradient, and the network
runs in float32 whatever the model's dtype.

The training module owns the network (it is trainable, so it joins the optimizer, the checkpoints and
DDP's gradient all-reduce): :class:`~mmpo.module.PreferenceModule` builds it in ``configure_model`` when
the loss asks for one (``SparsePOLoss(masks="learned")``) and :func:`mmpo.token_kl.token_kl_statistics`
applies it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MASKS_PER_TOKEN", "TokenMaskNetwork"]

MASKS_PER_TOKEN = 2  # m_u (reward) and m_d (KL)


class _MaskModel(nn.Module):
    """One mask: shared LayerNorm, per-layer Linear(H → 1) → ReLU → dropout, Linear(L → 1) → ReLU → dropout."""

    def __init__(self, num_layers: int, hidden_size: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.layers = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(num_layers))
        self.mixer = nn.Linear(num_layers, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: Tensor) -> Tensor:  # (N, L, R, H) → (N, R)
        per_layer = [
            self.dropout(torch.relu(layer(self.norm(hidden[:, i].float()))))  # (N, R, 1)
            for i, layer in enumerate(self.layers)
        ]
        return self.dropout(torch.relu(self.mixer(torch.cat(per_layer, dim=-1)))).squeeze(-1)


class TokenMaskNetwork(nn.Module):
    """Per-token masks ≥ 0 for SparsePO's reward (m_u) and KL (m_d) terms from L layers' hidden states.

    Args:
        num_layers: L, the hidden states read per token (the model's decoder layers).
        hidden_size: H, their width.
        independent: one network per mask (the official ``rw_kl_independent``); else one common mask
            serves both terms (the official default).
        dropout: after each layer's ReLU and after the mixer's (the official ``mask_dropout``, 0.01).
        eps: the LayerNorm's epsilon (the official code takes the model's ``layer_norm_eps``).
    """

    def __init__(
        self, num_layers: int, hidden_size: int, independent: bool = False, dropout: float = 0.01, eps: float = 1e-5
    ) -> None:
        super().__init__()
        if num_layers < 1 or hidden_size < 1:
            raise ValueError(
                f"a token mask network needs num_layers >= 1 and hidden_size >= 1, got {num_layers}, {hidden_size}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_layers, self.hidden_size, self.independent = num_layers, hidden_size, independent
        count = MASKS_PER_TOKEN if independent else 1
        self.masks = nn.ModuleList(_MaskModel(num_layers, hidden_size, eps, dropout) for _ in range(count))

    def forward(self, hidden: Tensor) -> Tensor:
        """Masks of every token.

        Args:
            hidden: (N, L, R, H) the L layers' hidden states at the positions that predict R tokens.

        Returns:
            (N, R, 2) float32 masks ≥ 0: ``[..., 0]`` weighs the reward term, ``[..., 1]`` the KL term (the
            same values twice with a common mask).
        """
        if hidden.dim() != 4 or hidden.shape[1] != self.num_layers or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"the token mask network reads (N, {self.num_layers}, R, {self.hidden_size}) hidden states, "
                f"got {tuple(hidden.shape)}"
            )
        out = [mask(hidden) for mask in self.masks]  # each (N, R)
        return torch.stack(out * (MASKS_PER_TOKEN // len(out)), dim=-1)  # (N, R, 2)
