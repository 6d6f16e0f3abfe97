"""ViP-FGP, fine-grained perception (paper Sec. 4.1, Eq. 6; release class "FGP").

The two text embeddings attend over one layer's patch tokens: q from the text, k and v from the patches,
8 heads, softmax over the patches, output projection, L2 normalisation. As in the authors' release the
scores are *not* scaled by 1/sqrt(d) (the paper's Eq. 6 writes the scaling; the released weights were
trained without it). One module serves all tapped layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FineGrainedPerception(nn.Module):
    def __init__(self, dim: int, heads: int = 8) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"FGP width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        # The release carries this scalar (and counts it in its 4.15 M parameters) but never uses it.
        self.unused_scale = nn.Parameter(torch.ones(()))

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """text [B or 1, T, D] (normalised), patches [B, HW, D] (normalised) -> layer-specific text [B, T, D].

        Computed without projecting the patches. With q_h one head's query [T, d] and W_h its rows of a
        projection [d, D]: q_h.(W_k,h p + b_k,h) = (q_h W_k,h).p + q_h.b_k,h, and since each softmax row sums
        to 1, softmax(.) @ (P W_v,h^T + b_v,h) = (softmax(.) @ P) W_v,h^T + b_v,h. So the attention runs on the
        raw [HW, D] patches and the k/v projections touch T rows instead of HW: 2*HW*D*D fewer multiply-adds
        per layer and image (13 GFLOP per image over 4 layers for ViT-L/14 at 518 px), same result up to rounding.
        """
        text = text.expand(patches.shape[0], -1, -1)
        batch, n_text, dim = text.shape
        head_dim = dim // self.heads
        scores = self._scores(text, patches)  # [B, h*T, HW]
        w_v = self.v_proj.weight.view(self.heads, head_dim, dim)  # [h, d, D]
        pooled = torch.bmm(scores.softmax(dim=-1), patches).view(batch, self.heads, n_text, dim)  # [B, h, T, D]
        attended = torch.einsum("bhte,hde->bhtd", pooled, w_v) + self.v_proj.bias.view(1, self.heads, 1, head_dim)
        merged = attended.transpose(1, 2).reshape(batch, n_text, dim)
        return F.normalize(self.out_proj(merged), dim=-1)

    def attention(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Where each text embedding looks (paper Fig. 3): its attention weights over the patches, averaged over
        the heads -> [B, T, HW], each row summing to 1. The weights `forward` pools the patches with."""
        text = text.expand(patches.shape[0], -1, -1)
        batch, n_text, _ = text.shape
        weights = self._scores(text, patches).softmax(dim=-1)
        return weights.view(batch, self.heads, n_text, -1).mean(dim=1)

    def _scores(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Unscaled attention logits of every head and text row over the patches: text [B, T, D] -> [B, h*T, HW]."""
        batch, n_text, dim = text.shape
        head_dim = dim // self.heads
        q = self.q_proj(text).view(batch, n_text, self.heads, head_dim).transpose(1, 2)  # [B, h, T, d]
        w_k = self.k_proj.weight.view(self.heads, head_dim, dim)  # [h, d, D]
        q_in = torch.einsum("bhtd,hde->bhte", q, w_k).reshape(batch, self.heads * n_text, dim)  # [B, h*T, D]
        # The key bias adds one constant per query row, which the softmax cancels; kept for the exact release form.
        key_bias = (q * self.k_proj.bias.view(1, self.heads, 1, head_dim)).sum(-1).view(batch, -1, 1)  # [B, h*T, 1]
        return torch.baddbmm(key_bias, q_in, patches.transpose(1, 2))  # unscaled, as the release
