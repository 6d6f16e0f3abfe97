"""Frozen open_clip CLIP: resized positional grid, intermediate patch tokens, prompt-embedding text forward.

The image side runs its own block loop (no forward hooks) so that the patch tokens after the chosen
blocks come out of one pass. The text side takes prompt *embeddings* (the learnable prompts are vectors,
not token ids) and, optionally, only the first positions: with CLIP's causal mask nothing after the
end-of-text token can change it, so encoding 13 positions instead of 77 is exact.
Weights are loaded by `vip2clip.model.weights`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn


@dataclass(frozen=True)
class ImageFeatures:
    """Frozen image-encoder outputs: everything ViP²-CLIP needs from the vision tower.

    patch_tokens: one [B, HW, D] tensor per tapped block (through ln_post and proj, L2-normalised).
    global_feature: [B, D], the last block's class token times proj (no ln_post), L2-normalised.
    grid: (h, w) of the patch grid.
    """

    patch_tokens: tuple[torch.Tensor, ...]
    global_feature: torch.Tensor
    grid: tuple[int, int]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ImageFeatures:
        return ImageFeatures(
            tuple(t.to(device=device, dtype=dtype) for t in self.patch_tokens),
            self.global_feature.to(device=device, dtype=dtype),
            self.grid,
        )


class FrozenCLIP(nn.Module):
    """Frozen CLIP with the two entry points ViP²-CLIP needs.

    `encode_image(images [B,3,H,W]) -> ImageFeatures` and
    `encode_prompts(embeddings [N,L,D_text], eot [N]) -> [N, D]` (L2-normalised).
    """

    def __init__(
        self,
        clip: CLIP,
        feature_layers: tuple[int, ...] | None = None,
        pos_embed_interpolation: str = "bilinear",
        name: str = "",
        weights_source: str = "",
    ) -> None:
        super().__init__()
        self.clip = clip
        self.name = name
        self.weights_source = weights_source
        self.depth = len(clip.visual.transformer.resblocks)
        self.feature_layers = tuple(feature_layers) if feature_layers else default_feature_layers(self.depth)
        bad = [layer for layer in self.feature_layers if not 1 <= layer <= self.depth]
        if bad:
            raise ValueError(f"feature layers {bad} outside 1..{self.depth} for backbone {name!r}")
        self.pos_embed_interpolation = pos_embed_interpolation
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    @property
    def embed_dim(self) -> int:
        return int(self.clip.visual.proj.shape[1])

    @property
    def token_dim(self) -> int:
        return int(self.clip.token_embedding.weight.shape[1])

    @property
    def patch_size(self) -> int:
        return int(self.clip.visual.conv1.kernel_size[0])

    def train(self, mode: bool = True) -> FrozenCLIP:
        # Always eval: the backbone is frozen (no dropout, no patch dropout), whatever the parent does.
        return super().train(False)

    def positional_embedding(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[1 + h*w, W]: the class position as is, the square grid resized to `grid` (computed once per grid)."""
        key = (grid, device, dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = resize_positional_embedding(
                self.clip.visual.positional_embedding.detach(), grid, self.pos_embed_interpolation
            ).to(device=device, dtype=dtype)
        return self._pos_cache[key]

    def _apply(self, fn, *args, **kwargs):
        self._pos_cache.clear()  # device or dtype may change
        return super()._apply(fn, *args, **kwargs)

    def compile_blocks(self, **options) -> None:
        """torch.compile every transformer block of both towers in place (identical blocks share one graph)."""
        for block in (*self.clip.visual.transformer.resblocks, *self.clip.transformer.resblocks):
            block.compile(**options)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """images [B,3,H,W] (normalised) -> ImageFeatures with patch tokens of `feature_layers`."""
        visual = self.clip.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # [B, W, h, w]
        grid = (int(x.shape[2]), int(x.shape[3]))
        x = x.flatten(2).transpose(1, 2)  # [B, hw, W]
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(grid, x.device, x.dtype)
        x = visual.ln_pre(x)
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        taps = []
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x)
            if index in self.feature_layers:
                taps.append(x if batch_first else x.transpose(0, 1))
        last = x if batch_first else x.transpose(0, 1)
        patch_tokens = tuple(F.normalize(visual.ln_post(t[:, 1:]) @ visual.proj, dim=-1) for t in taps)
        global_feature = F.normalize(last[:, 0] @ visual.proj, dim=-1)
        return ImageFeatures(patch_tokens, global_feature, grid)

    def encode_prompts(
        self, embeddings: torch.Tensor, eot_positions: torch.Tensor, n_positions: int | None = None
    ) -> torch.Tensor:
        """Prompt embeddings [N, L, D_text] -> L2-normalised text features [N, D].

        n_positions: encode only the first n positions (must cover every end-of-text position).
        """
        clip = self.clip
        length = embeddings.shape[1] if n_positions is None else n_positions
        if int(eot_positions.max()) >= length:
            raise ValueError(f"n_positions={length} cuts off an end-of-text token at {int(eot_positions.max())}")
        x = embeddings[:, :length] + clip.positional_embedding[:length].to(embeddings.dtype)
        mask = clip.attn_mask[:length, :length].to(device=x.device, dtype=x.dtype)
        x = clip.transformer(x, attn_mask=mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_positions]
        projection = clip.text_projection
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x, dim=-1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N, 77] -> token embeddings [N, 77, D_text] (for the fixed parts of the prompts)."""
        return self.clip.token_embedding(tokens).detach()

    def fingerprint(self) -> str:
        """Short hash of the backbone's weights (a strided sample of every tensor): keys the feature cache."""
        digest = hashlib.sha256(self.name.encode())
        for key, tensor in sorted(self.clip.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)].float().cpu().numpy()
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.tobytes())
        return digest.hexdigest()[:16]


def default_feature_layers(depth: int) -> tuple[int, ...]:
    """The quarter-depth blocks (1-based): 6/12/18/24 for a 24-block ViT, as in the paper."""
    if depth < 4:
        return tuple(range(1, depth + 1))
    return tuple(depth * quarter // 4 for quarter in (1, 2, 3, 4))


def resize_positional_embedding(pos: torch.Tensor, grid: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """[1 + g*g, W] -> [1 + h*w, W]: class position kept, square grid interpolated (align_corners=False)."""
    old = round((pos.shape[0] - 1) ** 0.5)
    if (old, old) == tuple(grid):
        return pos
    patches = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    align = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    resized = F.interpolate(patches.float(), size=grid, mode=mode, **align).to(pos.dtype)
    return torch.cat([pos[:1], resized.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])], dim=0)
