"""A random checkpoint in the authors' release format (their prompt learner's and FGP's state-dict names and
shapes), written from the release's facts, importing nothing of vip2clip: what the converter and the release
equivalence checks load."""

from __future__ import annotations

import torch
from open_clip.tokenizer import tokenize

N_CTX, N_DYN = 7, 3


def random_release_checkpoint(token_embedding: torch.Tensor, seed: int) -> dict:
    """A random checkpoint in the release's format for a CLIP of `token_embedding`'s width (768 for ViT-L/14)."""
    generator = torch.Generator().manual_seed(seed)
    width = token_embedding.shape[1]
    hidden = width // 2

    def rand(*shape: int, std: float = 0.05) -> torch.Tensor:
        return std * torch.randn(*shape, generator=generator)

    tokens = tokenize([" ".join(["X"] * N_CTX + ["damaged"] + ["X"] * N_DYN)])
    embedded = token_embedding[tokens]
    prompt = {"ctx_pos": rand(N_CTX, width), "ctx_neg": rand(N_CTX, width), "cls_ctx": rand(N_DYN, width)}
    prompt["cls_prompter.bias"] = rand(1, width)
    for head in range(N_DYN):
        prompt[f"cls_prompter.fc.{head}.0.weight"] = rand(hidden, width)
        prompt[f"cls_prompter.fc.{head}.0.bias"] = rand(hidden)
        prompt[f"cls_prompter.fc.{head}.2.weight"] = rand(width, hidden)
        prompt[f"cls_prompter.fc.{head}.2.bias"] = rand(width)
    for tag in ("pos", "neg"):  # the release's quirk: both from the anomalous sentence
        prompt[f"token_prefix_{tag}"] = embedded[:, :1].clone()
        prompt[f"token_middle_{tag}"] = embedded[:, 1 + N_CTX : 2 + N_CTX].clone()
        prompt[f"token_suffix_{tag}"] = embedded[:, 2 + N_CTX + N_DYN :].clone()
        prompt[f"tokenized_prompts_{tag}"] = tokens.clone()
    fgp = {"prompt_temp_l1": torch.tensor([0.07])}
    for name in ("q_proj_pre", "k_proj_pre_1", "v_proj_pre_1", "proj_post_t"):
        fgp[f"{name}.weight"] = rand(width, width, 1)
        fgp[f"{name}.bias"] = rand(width)
    return {"prompt_learner": prompt, "Zero_try": fgp}
