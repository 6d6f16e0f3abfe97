"""Frozen open_clip CLIP: resized positional grid, intermediate patch tokens, prompt-embedding text forward.

Both towers run their own block loop (no forward hooks), so that the patch tokens after the chosen
blocks come out of one pass, and each block's attention runs through `F.scaled_dot_product_attention` on
the block's own weights (`block_forward`). open_clip's blocks call `nn.MultiheadAttention` with
`batch_first=True`, whose inference fast path is about 1.5x slower than SDPA on CPUs for ViT-L's 1,370
tokens; SDPA also picks flash / memory-efficient kernels on CUDA and exports to ONNX. The weights,
parameter names and checkpoints stay open_clip's; blocks of other kinds run open_clip's own forward.
The text side takes prompt *embeddings* (the learnable prompts are vectors, not token ids) and,
optionally, only the first positions: with CLIP's causal mask nothing after the end-of-text token can
change it, so encoding 13 positions instead of 77 is exact.
Weights are loaded by `vip2clip.model.weights`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from vip2clip.model.linear import linear, mlp

logger = logging.getLogger(__name__)


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
        *,
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
        # False runs open_clip's own block forward (nn.MultiheadAttention) everywhere: for comparisons only.
        self.sdpa = True
        # bf16/fp16: the SDPA blocks' matrix products and attention run in it; residuals and LayerNorms stay fp32.
        self.compute_dtype: torch.dtype | None = None
        self._block_forward = block_forward
        self.text_causal = is_causal_mask(clip.attn_mask)
        for tower, transformer in (("vision", clip.visual.transformer), ("text", clip.transformer)):
            for index, block in enumerate(transformer.resblocks, start=1):
                reason = sdpa_unsupported(block)
                if reason:
                    logger.info("%s %s block %d runs open_clip's own forward: %s", name, tower, index, reason)

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

    def positional_embedding(self, grid: tuple[int, int], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[1 + h*w, W]: the class position as is, the square grid resized to `grid` (computed once per grid)."""
        key = (grid, device, dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = resize_positional_embedding(
                self.clip.visual.positional_embedding.detach(), grid, mode=self.pos_embed_interpolation
            ).to(device=device, dtype=dtype)
        return self._pos_cache[key]

    def _apply(self, fn, *args, **kwargs):
        self._pos_cache.clear()  # device or dtype may change
        return super()._apply(fn, *args, **kwargs)

    def compile_blocks(self, **options) -> None:
        """torch.compile the SDPA block forward and, for the blocks that run their own forward, every block in
        place (identical blocks share one graph)."""
        self._block_forward = torch.compile(block_forward, **options)
        for block in (*self.clip.visual.transformer.resblocks, *self.clip.transformer.resblocks):
            block.compile(**options)

    def _blocks(
        self,
        transformer: nn.Module,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        taps: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, L, W] through every block of `transformer` -> (last output, outputs of the 1-based blocks `taps`).

        mask: open_clip's additive [L, L] mask; causal: it is the causal mask (SDPA's is_causal, no mask tensor).
        """
        batch_first = getattr(transformer, "batch_first", True)
        # Other devices: the caller's autocast. An exported graph is fp32 whatever the model's precision (its
        # runtime chooses how to compute it), and the bf16 path's oneDNN ops have no ONNX translation.
        exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()
        dtype = self.compute_dtype if x.device.type == "cpu" and not exporting else None
        tapped = []
        for index, block in enumerate(transformer.resblocks, start=1):
            if self.sdpa and sdpa_unsupported(block) is None:
                x = self._block_forward(block, x, mask=mask, causal=causal, dtype=dtype)
            elif batch_first:
                x = block(x, attn_mask=mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
            if index in taps:
                tapped.append(x)
        return x, tapped

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """images [B,3,H,W] (normalised) -> ImageFeatures with patch tokens of `feature_layers`."""
        visual = self.clip.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # [B, W, h, w]
        grid = (int(x.shape[2]), int(x.shape[3]))
        x = x.flatten(2).transpose(1, 2)  # [B, hw, W]
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(grid, device=x.device, dtype=x.dtype)
        last, taps = self._blocks(visual.transformer, visual.ln_pre(x), taps=self.feature_layers)
        patch_tokens = tuple(F.normalize(linear(visual.ln_post(t[:, 1:]), visual.proj.T), dim=-1) for t in taps)
        global_feature = F.normalize(last[:, 0] @ visual.proj, dim=-1)
        return ImageFeatures(patch_tokens, global_feature, grid)

    def encode_prompts(
        self, embeddings: torch.Tensor, eot_positions: torch.Tensor, *, n_positions: int | None = None
    ) -> torch.Tensor:
        """Prompt embeddings [N, L, D_text] -> L2-normalised text features [N, D].

        n_positions: encode only the first n positions (must cover every end-of-text position; a Python int).
        """
        clip = self.clip
        length = embeddings.shape[1] if n_positions is None else n_positions
        # Reading tensor values is impossible while torch.export traces (ONNX export): the caller checked then.
        if not torch.compiler.is_compiling() and int(eot_positions.max()) >= length:
            raise ValueError(f"n_positions={length} cuts off an end-of-text token at {int(eot_positions.max())}")
        x = embeddings[:, :length] + clip.positional_embedding[:length].to(embeddings.dtype)
        mask = None if clip.attn_mask is None else clip.attn_mask[:length, :length].to(x.device, x.dtype)
        x, _ = self._blocks(clip.transformer, x, mask=mask, causal=self.text_causal)
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


def resize_positional_embedding(pos: torch.Tensor, grid: tuple[int, int], *, mode: str = "bilinear") -> torch.Tensor:
    """[1 + g*g, W] -> [1 + h*w, W]: class position kept, square grid interpolated (align_corners=False)."""
    old = round((pos.shape[0] - 1) ** 0.5)
    if (old, old) == tuple(grid):
        return pos
    patches = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    align = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    resized = F.interpolate(patches.float(), size=grid, mode=mode, **align).to(pos.dtype)
    return torch.cat([pos[:1], resized.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])], dim=0)


def sdpa_unsupported(block: nn.Module) -> str | None:
    """Why `block_forward` cannot stand in for `block`'s own forward exactly; None when it can.

    Supported: open_clip's `ResidualAttentionBlock` (pre-norm, optional LayerScale, any MLP) with a plain
    self-attention `nn.MultiheadAttention`. Not: `CustomResidualAttentionBlock` (qk-norm, scaled cosine
    attention, head scales), cross-attention blocks, attention with separate q/k/v widths, bias_k/bias_v or
    add_zero_attn, and subclasses that override forward. Those run open_clip's own forward.
    """
    if not isinstance(block, ResidualAttentionBlock) or type(block).forward is not ResidualAttentionBlock.forward:
        return f"{type(block).__name__} is not open_clip's ResidualAttentionBlock"
    attn = block.attn
    if type(attn) is not nn.MultiheadAttention:
        return f"its attention is {type(attn).__name__}, not nn.MultiheadAttention"
    if hasattr(block, "ln_1_kv"):
        return "cross-attention block"
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        return "attention with separate key/value widths, bias_k/bias_v or add_zero_attn"
    return None


def block_forward(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """open_clip's `ResidualAttentionBlock.forward` with the attention through SDPA and the linear layers through
    `vip2clip.model.linear` (oneDNN on CPUs), on the block's own weights.

    x [B, L, W] (batch first) -> [B, L, W]. mask: additive [L, L] mask (ignored when `causal`); causal: apply
    the causal mask as SDPA's `is_causal`. Equal to `block(x, attn_mask=mask)` up to float rounding.
    dtype: run the linear layers, the attention and the activation in it (bf16: oneDNN's bf16 kernels); the
    residual stream and the LayerNorms stay in x's dtype.
    """
    attn = block.attn
    low = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    qkv = linear(low(block.ln_1(x)), attn.in_proj_weight, bias=attn.in_proj_bias)  # [B, L, 3W]
    q, k, v = qkv.unflatten(-1, (3, attn.num_heads, attn.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, L, d]
    if causal or mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    out = linear(out.transpose(1, 2).flatten(2), attn.out_proj.weight, bias=attn.out_proj.bias)  # [B, L, W]
    x = x + block.ls_1(out)  # a bf16 branch is promoted to x's dtype in the addition itself
    return x + block.ls_2(mlp(block.mlp, low(block.ln_2(x))))


def is_causal_mask(mask: torch.Tensor | None) -> bool:
    """True if `mask` is the additive causal mask (-inf above the diagonal, 0 elsewhere) of a square length."""
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    causal = torch.full(tuple(mask.shape), float("-inf")).triu(1)
    return torch.equal(mask.detach().float().cpu(), causal)
