"""An independent re-implementation of the authors' release computation, for tests only.

Written from the facts of the release (OpenAI CLIP forward from the raw state dict, Conv1d FGP, per-layer
upsampling before averaging, scipy's gaussian_filter, the full 77-token text forward), with no vip2clip
and no open_clip modules, so that it can disagree with the package.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def _layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-5)


def _attention(x, sd, *, prefix, heads, mask=None):
    batch, length, width = x.shape
    qkv = x @ sd[f"{prefix}.in_proj_weight"].T + sd[f"{prefix}.in_proj_bias"]
    q, k, v = qkv.split(width, dim=-1)
    q, k, v = (t.reshape(batch, length, heads, width // heads).permute(0, 2, 1, 3) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(batch, length, width)
    return out @ sd[f"{prefix}.out_proj.weight"].T + sd[f"{prefix}.out_proj.bias"]


def _block(x, sd, *, prefix, heads, mask=None):
    x = x + _attention(_layer_norm(x, sd, f"{prefix}.ln_1"), sd, prefix=f"{prefix}.attn", heads=heads, mask=mask)
    hidden = _layer_norm(x, sd, f"{prefix}.ln_2") @ sd[f"{prefix}.mlp.c_fc.weight"].T + sd[f"{prefix}.mlp.c_fc.bias"]
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU
    return x + hidden @ sd[f"{prefix}.mlp.c_proj.weight"].T + sd[f"{prefix}.mlp.c_proj.bias"]


def vision_forward(sd, images, *, layers, heads):
    """-> (list of normalised patch tokens per layer [B, HW, D], normalised global feature [B, D], grid)."""
    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=patch)
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    pos = sd["visual.positional_embedding"]
    side = round((pos.shape[0] - 1) ** 0.5)
    pos_grid = pos[1:].T.reshape(1, -1, side, side)
    pos_grid = F.interpolate(pos_grid, size=tuple(grid), mode="bilinear", align_corners=False)
    pos = torch.cat([pos[:1], pos_grid.reshape(pos.shape[1], -1).T])
    x = _layer_norm(torch.cat([cls, x], dim=1) + pos, sd, "visual.ln_pre")
    n_blocks = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    taps = []
    for i in range(n_blocks):
        x = _block(x, sd, prefix=f"visual.transformer.resblocks.{i}", heads=heads)
        if i + 1 in layers:
            taps.append(x)
    proj = sd["visual.proj"]
    patches = [F.normalize(_layer_norm(t, sd, "visual.ln_post")[:, 1:] @ proj, dim=-1) for t in taps]
    return patches, F.normalize(x[:, 0] @ proj, dim=-1), tuple(grid)


def text_forward(sd, prompts, *, eot, heads):
    """Full-length prompts [N, 77, D] -> normalised features [N, D]."""
    length = prompts.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = prompts + sd["positional_embedding"]
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(n_blocks):
        x = _block(x, sd, prefix=f"transformer.resblocks.{i}", heads=heads, mask=mask)
    x = _layer_norm(x, sd, "ln_final")
    return F.normalize(x[torch.arange(x.shape[0]), eot] @ sd["text_projection"], dim=-1)


def release_prompts(pl, global_feature):
    """The release's ICA prompt assembly: [B, 2, 77, D] (normal, anomalous) and the two eot positions."""
    conditioned = global_feature + pl["cls_prompter.bias"]
    heads = sorted({int(k.split(".")[2]) for k in pl if k.startswith("cls_prompter.fc.")})
    dynamic = []
    for h in heads:
        hidden = torch.relu(conditioned @ pl[f"cls_prompter.fc.{h}.0.weight"].T + pl[f"cls_prompter.fc.{h}.0.bias"])
        dynamic.append(hidden @ pl[f"cls_prompter.fc.{h}.2.weight"].T + pl[f"cls_prompter.fc.{h}.2.bias"])
    z = pl["cls_ctx"].unsqueeze(0) + torch.stack(dynamic, dim=1)  # [B, r, D]
    batch = z.shape[0]
    sentences = []
    for tag in ("pos", "neg"):
        parts = [
            pl[f"token_prefix_{tag}"].expand(batch, -1, -1),
            pl[f"ctx_{tag}"].unsqueeze(0).expand(batch, -1, -1),
            pl[f"token_middle_{tag}"].expand(batch, -1, -1),
            z,
            pl[f"token_suffix_{tag}"].expand(batch, -1, -1),
        ]
        sentences.append(torch.cat(parts, dim=1))
    eot = torch.stack([pl["tokenized_prompts_pos"][0].argmax(), pl["tokenized_prompts_neg"][0].argmax()])
    return torch.stack(sentences, dim=1), eot


def _conv1d(x, fgp, name):
    """The release applies 1x1 Conv1d on [B, D, L]."""
    return F.conv1d(x.transpose(1, 2), fgp[f"{name}.weight"], fgp[f"{name}.bias"]).transpose(1, 2)


def fgp_forward(fgp, text, *, patches, heads=8):
    q = _conv1d(text, fgp, "q_proj_pre")
    k = _conv1d(patches, fgp, "k_proj_pre_1")
    v = _conv1d(patches, fgp, "v_proj_pre_1")
    batch, n_text, width = q.shape
    split = lambda t: t.reshape(batch, t.shape[1], heads, width // heads).permute(0, 2, 1, 3)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2)).softmax(dim=-1)  # no 1/sqrt(d)
    out = (weights @ split(v)).permute(0, 2, 1, 3).reshape(batch, n_text, width)
    return F.normalize(_conv1d(out, fgp, "proj_post_t"), dim=-1)


def release_similarities(layer_texts, patches, *, tau=0.07):
    """Per layer (sim [B, HW, 2], probs [B, HW, 2]): patch-text cosines and their softmax at tau."""
    sims = [layer_patches @ text.transpose(1, 2) for text, layer_patches in zip(layer_texts, patches, strict=True)]
    return [(sim, (sim / tau).softmax(-1)) for sim in sims]


def release_score(similarities, *, top_k=50, tau=0.07):
    """Image scores [B]: each layer's top-K patches by anomalous probability, their raw sims pooled, / tau, softmax."""
    pooled = []
    for sim, probs in similarities:
        index = probs[..., 1].topk(min(top_k, sim.shape[1]), dim=1).indices
        pooled.append(torch.stack([sim[b, index[b]] for b in range(sim.shape[0])]))
    return (torch.cat(pooled, dim=1).mean(dim=1) / tau).softmax(-1)[:, 1]


def release_map(similarities, *, grid, size, sigma=8.0):
    """Anomaly maps [B, H, W] (numpy): per-layer bilinear upsampling of both states, layer mean, scipy Gaussian."""
    maps = []
    for _sim, probs in similarities:
        grid_probs = probs.transpose(1, 2).reshape(probs.shape[0], 2, *grid)
        maps.append(F.interpolate(grid_probs, size=tuple(size), mode="bilinear", align_corners=False)[:, 1])
    fused = torch.stack(maps).mean(dim=0).numpy()
    return np.stack([gaussian_filter(m, sigma=sigma) for m in fused])


def release_predict(clip_sd, ckpt, *, images, layers, vision_heads, text_heads, top_k=50, sigma=8.0, tau=0.07):
    """-> (image scores [B] numpy, smoothed anomaly maps [B, H, W] numpy), the release's way."""
    clip_sd = {k: v.double() if v.is_floating_point() else v for k, v in clip_sd.items()}
    pl = {k: v.double() if v.is_floating_point() else v for k, v in ckpt["prompt_learner"].items()}
    fgp = {k: v.double() for k, v in ckpt["Zero_try"].items()}
    with torch.no_grad():
        patches, global_feature, grid = vision_forward(clip_sd, images.double(), layers=layers, heads=vision_heads)
        prompts, eot = release_prompts(pl, global_feature)
        batch = prompts.shape[0]
        text = text_forward(
            clip_sd, prompts.reshape(batch * 2, *prompts.shape[2:]), eot=eot.repeat(batch), heads=text_heads
        )
        text = text.reshape(batch, 2, -1)
        similarities = release_similarities([fgp_forward(fgp, text, patches=p) for p in patches], patches, tau=tau)
        score = release_score(similarities, top_k=top_k, tau=tau)
        smoothed = release_map(similarities, grid=grid, size=images.shape[-2:], sigma=sigma)
    return score.numpy(), smoothed
