"""Full-size check (run by hand): ViT-L/14@336 at 518 px, our predict vs an independent release re-implementation.

Random CLIP weights (saved as an OpenAI-layout state dict) and a random release-format checkpoint; prints the
largest score difference and the largest relative map difference. The test suite runs the same comparison on
the tiny backbone (tests/model/test_release_equivalence.py); this script shows it holds at the paper's size.
Usage: python benchmarks/check_release_equivalence.py [--images 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP

import vip2clip
from vip2clip.testing.release_checkpoint import random_release_checkpoint
from vip2clip.testing.release_reference import release_predict


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
    scores, maps = release_predict(
        clip_state, checkpoint, images=images, layers=(6, 12, 18, 24), vision_heads=16, text_heads=12
    )
    print(f"release re-implementation (float64): {time.perf_counter() - start:.1f} s")
    score_diff = np.abs(ours.pred_score.numpy() - scores).max()
    map_rel = (np.abs(ours.anomaly_map.numpy() - maps) / np.abs(maps)).max()
    print(f"scores ours {ours.pred_score.tolist()} reference {scores.tolist()}")
    print(
        f"max |score difference| {score_diff:.2e}; max relative map difference {map_rel:.2e}; map std {maps.std():.2e}"
    )


if __name__ == "__main__":
    main()
