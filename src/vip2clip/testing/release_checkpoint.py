"""A random checkpoint in the authors' release format (their prompt learner's and FGP's state-dict names and
shapes), written from the release's facts, importing nothing of vip2clip: what the converter and the release
equivalence checks load."""

from __future__ import annotations

import torch
from open_clip.tokenizer import tokenize

N_CTX, N_DYN = 7, 3  # the release's defaults (--n_ctx, --n_cls)


def random_release_checkpoint(
    token_embedding: torch.Tensor,
    seed: int,
    *,
    n_ctx: int = N_CTX,
    n_dyn: int = N_DYN,
    hidden: int | None = None,
    std: float = 0.05,
    weight_std: float | None = None,
) -> dict:
    """A random checkpoint in the release's format for a CLIP of `token_embedding`'s width (768 for ViT-L/14).
    `hidden`: the Meta-Net's hidden width (default: half the width, the release's); `std`: the spread of the random
    values, `weight_std` that of the Meta-Net's and FGP's weights (default `std`; larger ones make a wrong
    computation show on a tiny CLIP)."""
    generator = torch.Generator().manual_seed(seed)
    width = token_embedding.shape[1]
    hidden = hidden or width // 2
    weight_std = std if weight_std is None else weight_std

    def rand(*shape: int, spread: float = std) -> torch.Tensor:
        return spread * torch.randn(*shape, generator=generator)

    tokens = tokenize([" ".join(["X"] * n_ctx + ["damaged"] + ["X"] * n_dyn)])
    embedded = token_embedding[tokens]
    prompt = {"ctx_pos": rand(n_ctx, width), "ctx_neg": rand(n_ctx, width), "cls_ctx": rand(n_dyn, width)}
    prompt["cls_prompter.bias"] = rand(1, width)
    for head in range(n_dyn):
        prompt[f"cls_prompter.fc.{head}.0.weight"] = rand(hidden, width, spread=weight_std)
        prompt[f"cls_prompter.fc.{head}.0.bias"] = rand(hidden)
        prompt[f"cls_prompter.fc.{head}.2.weight"] = rand(width, hidden, spread=weight_std)
        prompt[f"cls_prompter.fc.{head}.2.bias"] = rand(width)
    for tag in ("pos", "neg"):  # the release's quirk: both from the anomalous sentence
        prompt[f"token_prefix_{tag}"] = embedded[:, :1].clone()
        prompt[f"token_middle_{tag}"] = embedded[:, 1 + n_ctx : 2 + n_ctx].clone()
        prompt[f"token_suffix_{tag}"] = embedded[:, 2 + n_ctx + n_dyn :].clone()
        prompt[f"tokenized_prompts_{tag}"] = tokens.clone()
    fgp = {"prompt_temp_l1": torch.tensor([0.07])}
    for name in ("q_proj_pre", "k_proj_pre_1", "v_proj_pre_1", "proj_post_t"):
        fgp[f"{name}.weight"] = rand(width, width, 1, spread=weight_std)
        fgp[f"{name}.bias"] = rand(width)
    return {"prompt_learner": prompt, "Zero_try": fgp}
