"""The authors' release, imported from your clone of their repository (github.com/kim0806/ViP2-CLIP; nothing of it
is copied into vip2clip): its CLIP, prompt learner and FGP built by its own code, and its test-time computation
for one batch in the order its test.py runs it (`ReleaseComputation`), for `vip2clip study efficiency`.

Importing it today needs two stand-ins (`import_release`, shared with benchmarks/check_release_test.py):
- `pkg_resources` (gone with setuptools >= 81): a module exposing `packaging`, the one name the release imports
  from it (a torch version check);
- `torch.jit.load` rewinds the file when it fails, while the release loads CLIP weights: a plain state dict (not
  OpenAI's TorchScript archive) makes the release fall back to `torch.load` on the same, already read, file object.
"""

from __future__ import annotations

import contextlib
import io
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RELEASE_TEMPERATURE = 0.07


def check_clone(release_dir: Path) -> Path:
    """The clone's resolved path; ValueError when it is not a clone of the release."""
    release_dir = Path(release_dir).expanduser().resolve()
    if not (release_dir / "test.py").is_file() or not (release_dir / "VIP2CLIP_lib").is_dir():
        raise ValueError(
            f"{release_dir}: not a clone of the authors' release (no test.py and VIP2CLIP_lib/); "
            "git clone https://github.com/kim0806/ViP2-CLIP"
        )
    return release_dir


def import_release(release_dir: Path) -> None:
    """Make the clone's modules importable in this process (`sys.path`), with the `pkg_resources` stand-in."""
    import packaging.version  # noqa: F401 (the attribute the stand-in exposes)

    release = str(check_clone(release_dir))
    if release not in sys.path:
        sys.path.insert(0, release)
    sys.modules.setdefault("pkg_resources", types.ModuleType("pkg_resources"))
    sys.modules["pkg_resources"].packaging = sys.modules["packaging"]


@contextlib.contextmanager
def rewinding_jit_load() -> Iterator[None]:
    """`torch.jit.load` that rewinds its file object when it fails (module docstring), restored afterwards."""
    jit_load = torch.jit.load

    def rewinding(file, *args, **kwargs):
        start = file.tell()
        try:
            return jit_load(file, *args, **kwargs)
        except RuntimeError:
            file.seek(start)
            raise

    torch.jit.load = rewinding
    try:
        yield
    finally:
        torch.jit.load = jit_load


class ReleaseComputation:
    """The release's model, freshly initialised heads (ICA, FGP) on its CLIP loaded from `clip_weights` (an
    OpenAI-layout file), and its per-batch test computation: encoder taps, prompts, text encoder, FGP per layer,
    softmax at 0.07, bilinear maps, top-K pooled image score, SciPy's Gaussian filter per map."""

    def __init__(
        self,
        release_dir: Path,
        clip_weights: Path,
        *,
        device: torch.device,
        image_size: int,
        layers: Sequence[int],
        settings: dict[str, Any],
    ) -> None:
        """settings: n_ctx, n_dynamic, top_k, sigma (the release's test.py options)."""
        import_release(release_dir)
        import VIP2CLIP_lib
        from prompt_learner import FGP, ICA

        from utils import get_similarity_map

        details = {"Prompt_length": settings["n_ctx"], "Prompt_cls_length": settings["n_dynamic"]}
        with rewinding_jit_load(), contextlib.redirect_stdout(io.StringIO()):  # its debugging prints
            self.clip = VIP2CLIP_lib.load(str(clip_weights), device=device, design_details=None)[0]
            self.prompts = ICA(["object"], self.clip.to("cpu"), details).to(device).eval()
        dim = self.clip.text_projection.shape[1]
        self.fgp = FGP(dim_v=dim, dim_t=dim, dim_out=dim).to(device).eval()
        self.clip.to(device).eval()
        self.similarity_map = get_similarity_map
        self.image_size, self.layers, self.settings = image_size, list(layers), settings

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for module in (self.prompts, self.fgp) for p in module.parameters() if p.requires_grad)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[np.ndarray]]:
        """images [B, 3, S, S], normalised -> (image scores [B], smoothed maps, one [S, S] array per image)."""
        from scipy.ndimage import gaussian_filter

        global_feature, taps = self.clip.encode_image(images, self.layers)
        prompts, tokens = self.prompts(F.normalize(global_feature, dim=-1))
        text = self.clip.encode_text_learn(prompts, tokens).float()
        text = F.normalize(torch.stack(torch.chunk(text, 2, dim=0), dim=1), dim=-1)
        maps, pooled = [], []
        for tap in taps:
            patches = F.normalize(tap, dim=-1)[:, 1:]
            cosine = patches @ self.fgp(text, patches).transpose(1, 2)
            probability = (cosine / RELEASE_TEMPERATURE).softmax(-1)
            upsampled = self.similarity_map(probability, self.image_size)
            maps.append((upsampled[..., 1] + 1 - upsampled[..., 0]) / 2.0)
            top = probability[..., 1].topk(self.settings["top_k"], dim=-1).indices
            pooled.append(torch.gather(cosine, 1, top[..., None].expand(-1, -1, cosine.shape[-1])))
        score = (torch.cat(pooled, dim=1).mean(dim=1) / RELEASE_TEMPERATURE).softmax(dim=-1)[:, 1]
        mean_map = torch.stack(maps).mean(dim=0).cpu().numpy()
        return score.cpu(), [gaussian_filter(m, sigma=self.settings["sigma"], axes=(0, 1)) for m in mean_map]
