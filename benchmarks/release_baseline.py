"""The authors' release test-time forward, computed the way its code computes it: the speed baseline.

OpenAI's CLIP code (which the release runs): sequence-first tensors [L, N, W] and `nn.MultiheadAttention` without
`batch_first` (so PyTorch's F.multi_head_attention_forward, not the batch-first fast path open_clip's blocks hit),
LayerNorm, QuickGELU, float32. The text encoder runs all 77 positions. Then the release's heads, from
vip2clip/testing/release_reference.py: prompt assembly, the Conv1d FGP over every patch, per-layer bilinear upsampling
of the probability maps and SciPy's gaussian_filter per image. Weights: the same OpenAI-layout state dict the
model under test loads (tensors shared, not copied). For benchmarks only; the package never imports it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vip2clip.testing.release_reference import (
    fgp_forward,
    release_map,
    release_prompts,
    release_score,
    release_similarities,
)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP's block: x [L, N, W] (sequence first)."""

    def __init__(self, width: int, heads: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]
            )
        )
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])


class Visual(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, patch: int, grid: int, output: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output))


class ReleaseBaseline(nn.Module):
    """The release's frozen CLIP (OpenAI layout, so `load_state_dict` takes an OpenAI state dict) and its forward."""

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        checkpoint: dict,
        layers: tuple[int, ...],
        heads: tuple[int, int] = (16, 12),
        sigma: float = 8.0,
    ) -> None:
        """heads: (vision, text) attention heads (ViT-L/14: 16, 12). layers: tapped blocks, 1-based."""
        super().__init__()
        vision_width = state["visual.conv1.weight"].shape[0]
        vision_layers = len({key.split(".")[3] for key in state if key.startswith("visual.transformer.resblocks.")})
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        text_width, context = state["ln_final.weight"].shape[0], state["positional_embedding"].shape[0]
        text_layers = len({key.split(".")[2] for key in state if key.startswith("transformer.resblocks.")})
        self.visual = Visual(
            vision_width, vision_layers, heads[0], state["visual.conv1.weight"].shape[-1], grid,
            state["visual.proj"].shape[1],
        )  # fmt: skip
        mask = torch.full((context, context), float("-inf")).triu(1)
        self.transformer = Transformer(text_width, text_layers, heads[1], mask)
        self.positional_embedding = nn.Parameter(torch.empty(context, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.empty(text_width, state["text_projection"].shape[1]))
        own = self.state_dict()
        self.load_state_dict({key: value for key, value in state.items() if key in own}, assign=True)
        self.eval().requires_grad_(False)
        self.prompt = checkpoint["prompt_learner"]
        self.fgp = checkpoint["Zero_try"]
        self.layers, self.sigma = layers, sigma

    def encode_image(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, tuple[int, int]]:
        """-> (normalised patch tokens [B, HW, D] of `layers`, normalised global feature [B, D], grid)."""
        visual = self.visual
        x = visual.conv1(images)
        grid = (x.shape[2], x.shape[3])
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        pos = visual.positional_embedding
        side = round((pos.shape[0] - 1) ** 0.5)
        resized = F.interpolate(pos[1:].T.reshape(1, -1, side, side), size=grid, mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:1], resized.reshape(pos.shape[1], -1).T])
        cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + pos).permute(1, 0, 2)  # NLD -> LND
        taps = []
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x)
            if index in self.layers:
                taps.append(x.permute(1, 0, 2))
        patches = [F.normalize(visual.ln_post(t[:, 1:]) @ visual.proj, dim=-1) for t in taps]
        return patches, F.normalize(x.permute(1, 0, 2)[:, 0] @ visual.proj, dim=-1), grid

    def encode_text(self, global_feature: torch.Tensor) -> torch.Tensor:
        """The two per-image prompts, all 77 positions -> [B, 2, D]."""
        prompts, eot = release_prompts(self.prompt, global_feature)
        batch = prompts.shape[0]
        x = prompts.reshape(batch * 2, *prompts.shape[2:]) + self.positional_embedding
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0]), eot.repeat(batch)] @ self.text_projection
        return F.normalize(x, dim=-1).reshape(batch, 2, -1)

    def layer_texts(self, text: torch.Tensor, patches: list[torch.Tensor]) -> list[torch.Tensor]:
        """FGP: the Conv1d projections over every patch, per tapped layer -> [B, 2, D] each."""
        return [fgp_forward(self.fgp, text, patches=layer_patches) for layer_patches in patches]

    @staticmethod
    def similarities(layer_texts: list[torch.Tensor], patches: list[torch.Tensor]) -> list:
        """Per layer (cosines [B, HW, 2], softmax at 0.07)."""
        return release_similarities(layer_texts, patches)

    @staticmethod
    def score(similarities: list, top_k: int) -> torch.Tensor:
        return release_score(similarities, top_k=top_k)

    def smooth(self, similarities: list, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """Per-layer upsampling, layer mean, SciPy Gaussian -> [B, H, W]."""
        return release_map(similarities, grid=grid, size=size, sigma=self.sigma)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, top_k: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """images [B, 3, H, W] -> (scores [B], smoothed maps [B, H, W]) as numpy."""
        patches, global_feature, grid = self.encode_image(images)
        text = self.encode_text(global_feature)
        similarities = self.similarities(self.layer_texts(text, patches), patches)
        return self.score(similarities, top_k).numpy(), self.smooth(similarities, grid, tuple(images.shape[-2:]))
