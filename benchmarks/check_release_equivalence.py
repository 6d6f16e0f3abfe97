"""Full-size check (run by hand): ViT-L/14@336 at 518 px, our predict vs an independent release re-implementation.

Random CLIP weights (saved as an OpenAI-layout state dict) and a random release-format checkpoint; prints the
largest score difference and the largest relative map difference. The test suite runs the same comparison on
the tiny backbone (tests/model/test_release_equivalence.py); this script shows it holds at the paper's size.
Usage: python benchmarks/check_release_equivalence.py [--images 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import tokenize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model"))
from release_reference import release_predict

import vip2clip

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vip2clip_equiv_"))
    torch.manual_seed(5)
    clip_state = CLIP(**open_clip.get_model_config("ViT-L-14-336"), quick_gelu=True).state_dict()
    checkpoint = random_release_checkpoint(clip_state["token_embedding.weight"], seed=1)
    torch.save(clip_state, workdir / "clip.pt")
    torch.save(checkpoint, workdir / "release.pth")
    images = torch.randn(args.images, 3, 518, 518, generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    model = vip2clip.create_model("ViT-L-14-336", clip_weights=workdir / "clip.pt", checkpoint=workdir / "release.pth")
    ours = model.predict(images)
    print(f"vip2clip predict: {time.perf_counter() - start:.1f} s (model build included)")
    start = time.perf_counter()
    scores, maps = release_predict(clip_state, checkpoint, images, (6, 12, 18, 24), vision_heads=16, text_heads=12)
    print(f"release re-implementation (float64): {time.perf_counter() - start:.1f} s")
    score_diff = np.abs(ours.pred_score.numpy() - scores).max()
    map_rel = (np.abs(ours.anomaly_map.numpy() - maps) / np.abs(maps)).max()
    print(f"scores ours {ours.pred_score.tolist()} reference {scores.tolist()}")
    print(
        f"max |score difference| {score_diff:.2e}; max relative map difference {map_rel:.2e}; map std {maps.std():.2e}"
    )


if __name__ == "__main__":
    main()
