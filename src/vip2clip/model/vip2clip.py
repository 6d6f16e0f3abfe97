"""ViP²-CLIP: frozen CLIP + ViP-VCA prompts + ViP-FGP attention + UTPA scoring (paper Fig. 2).

`forward_features` is the whole trainable part, taking precomputed `ImageFeatures` so that training can
read them from the frozen-feature cache; `forward(images)` runs the image encoder first; `predict` gives
the release's test outputs (image score, smoothed anomaly map) without gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from vip2clip.config import ModelConfig
from vip2clip.model import preprocessing, utpa
from vip2clip.model.backbone import FrozenCLIP, ImageFeatures
from vip2clip.model.explain import Explanation, fgp_attention, make_explanation
from vip2clip.model.fgp import FineGrainedPerception
from vip2clip.model.handcrafted import handcrafted_text
from vip2clip.model.linear import fp32_library
from vip2clip.model.prompt import VisualConditionedPrompts
from vip2clip.model.state_check import state_mismatch
from vip2clip.outputs import ImageBatch
from vip2clip.utils.cpu_features import auto_precision, cpu_features

if TYPE_CHECKING:
    from PIL import Image

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_CHOICES = ("auto", *PRECISIONS)  # "auto": `resolve_precision` picks one of PRECISIONS for the device


def resolve_precision(precision: str, device: torch.device | str) -> tuple[str, str]:
    """(the precision to compute the frozen encoders in, why) for `precision` on `device`.

    "auto" is bf16 where the device multiplies bf16 natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs that support
    bf16) and fp32 elsewhere: emulated bf16 is slower than fp32, so auto is never slower than fp32."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISION_CHOICES)}")
    device_type = torch.device(device).type
    if precision != "auto":
        return precision, f"{precision} as asked"
    if device_type == "cpu":
        return auto_precision("cpu")
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16", "auto: bf16 (this GPU computes bf16 natively)"
    return "fp32", f"auto: fp32 (no native bf16 known on {device_type})"


@dataclass(kw_only=True)
class ForwardOutput:
    """The forward pass's raw outputs: what the losses read (training) and what `prediction_from_output` turns into
    an `ImageBatch` (the detection result, `vip2clip.outputs`).

    image_logits: [B, 2] (normal, anomalous) logits, already divided by the temperature.
    similarities / probabilities: one [B, HW, 2] tensor per tapped layer.
    text: the prompt features before FGP, [B or 1, 2, D].
    """

    image_logits: torch.Tensor
    similarities: list[torch.Tensor]
    probabilities: list[torch.Tensor]
    text: torch.Tensor
    grid: tuple[int, int]

    def probability_maps(self, size: tuple[int, int]) -> list[torch.Tensor]:
        """Per layer [B, 2, H, W]: the two state probabilities upsampled to `size` (for the losses)."""
        return [utpa.upsample(utpa.to_grid(p, self.grid), size) for p in self.probabilities]


class ViP2CLIP(nn.Module):
    def __init__(self, backbone: FrozenCLIP, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        dim = backbone.embed_dim
        if backbone.token_dim != dim:
            raise ValueError(f"backbone text width {backbone.token_dim} differs from its embedding width {dim}")
        self.prompts = VisualConditionedPrompts(
            token_dim=backbone.token_dim,
            n_context=config.n_context,
            n_dynamic=config.n_dynamic,
            metanet_hidden=config.metanet_hidden or dim // 2,
            use_vca=config.use_vca,
            context_length=int(backbone.clip.positional_embedding.shape[0]),
        )
        self.prompts.set_sentences(config.state_words, backbone.embed_tokens)
        self.fgp = FineGrainedPerception(dim, config.fgp_heads) if config.use_fgp else None
        self.precision = "fp32"
        self.precision_reason = "fp32 by default"

    def set_precision(self, precision: str) -> ViP2CLIP:
        """Run the frozen encoders in "bf16"/"fp16"; FGP, UTPA, the softmax and the smoothing stay fp32. "auto":
        bf16 where the model's device has native bf16, else fp32 (`resolve_precision`; call it after moving the
        model to its device); `precision` then holds the choice and `precision_reason` why.

        bf16 on the CPU runs every SDPA block's linear layers, attention and activation in bf16 (oneDNN's kernels,
        on bf16 copies of the frozen weights made once), residuals and LayerNorms in fp32
        (`FrozenCLIP.compute_dtype`); elsewhere (fp16, CUDA) the encoders run under autocast.
        """
        precision, self.precision_reason = resolve_precision(precision, self.backbone.clip.visual.proj.device)
        self.precision = precision
        self.backbone.compute_dtype = torch.bfloat16 if precision == "bf16" else None
        return self

    def describe_precision(self) -> str:
        """Where the model computes in which precision, and whether this CPU has native bf16 (for logs)."""
        device = self.backbone.clip.visual.proj.device.type
        if self.precision == "fp32":
            library = f" ({fp32_library()[1]})" if device == "cpu" else ""
            return f"fp32 everywhere{library}; {self.precision_reason}"
        if device != "cpu" or self.precision != "bf16":
            return (
                f"{self.precision} autocast for the frozen encoders on {device}; FGP, UTPA and smoothing in fp32; "
                + self.precision_reason
            )
        why = self.precision_reason  # auto's reason names the CPU's bf16 units; else say them here
        why = why if why.startswith("auto") else f"{why}; {cpu_features().describe_bf16()}"
        return (
            "bf16 encoders on the CPU (linear layers, attention and activations in bf16 through oneDNN; residuals, "
            f"LayerNorms, FGP, UTPA, softmax and smoothing in fp32); {why}"
        )

    def compile_encoders(self, **options) -> ViP2CLIP:
        """torch.compile the frozen encoders' transformer blocks in place (`options` go to torch.compile).

        Compilation happens on the first calls (seconds to minutes); parameter names, and so checkpoints,
        are unchanged. Worth it on a GPU for long runs; on the CPU it mostly costs the compile time.
        """
        self.backbone.compile_blocks(**options)
        return self

    def _encoder_autocast(self) -> contextlib.AbstractContextManager:
        dtype, device = PRECISIONS[self.precision], self.backbone.clip.visual.proj.device.type
        if dtype is None or (device == "cpu" and self.backbone.compute_dtype == dtype):
            return contextlib.nullcontext()  # fp32, or the backbone's own bf16 path
        return torch.autocast(device_type=device, dtype=dtype)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.backbone.feature_layers

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Frozen vision tower: images [B, 3, H, W] (normalised) -> ImageFeatures (fp32 whatever the precision)."""
        with self._encoder_autocast():
            features = self.backbone.encode_image(images)
        return features if self.precision == "fp32" else features.to(images.device, torch.float32)

    def encode_text(self, global_feature: torch.Tensor | None) -> torch.Tensor:
        """The two prompts' text features [B, 2, D] (or [1, 2, D] for static and hand-crafted prompts)."""
        if self.config.text_prompts == "handcrafted":
            with self._encoder_autocast():
                return handcrafted_text(self.backbone, self.config.state_words)
        eot = self.prompts.eot_positions()
        n_positions = self.prompts.text_length if self.config.truncate_text else None
        prompts = self.prompts(global_feature if self.config.use_vca else None, n_positions)  # [B, 2, L, Dt]
        batch, states = prompts.shape[:2]
        flat = prompts.reshape(batch * states, *prompts.shape[2:])
        with self._encoder_autocast():
            features = self.backbone.encode_prompts(flat, eot.repeat(batch), n_positions=n_positions)
        return features.float().view(batch, states, -1)

    def forward_features(self, features: ImageFeatures) -> ForwardOutput:
        """The trainable part, from (possibly cached) frozen features."""
        cfg = self.config
        text = self.encode_text(features.global_feature)
        similarities, probabilities = [], []
        for patches in features.patch_tokens:
            layer_text = self.fgp(text, patches) if self.fgp is not None else text.expand(patches.shape[0], -1, -1)
            similarity = utpa.patch_similarity(patches, layer_text)
            similarities.append(similarity)
            probabilities.append(utpa.state_probabilities(similarity, cfg.temperature))
        if cfg.use_utpa:
            logits = utpa.topk_image_logits(similarities, probabilities, top_k=cfg.top_k, temperature=cfg.temperature)
        else:
            logits = utpa.global_image_logits(features.global_feature, text, temperature=cfg.temperature)
        return ForwardOutput(
            image_logits=logits, similarities=similarities, probabilities=probabilities, text=text, grid=features.grid
        )

    def forward(self, images: torch.Tensor) -> ForwardOutput:
        return self.forward_features(self.encode_image(images))

    def prediction_from_output(self, output: ForwardOutput, size: tuple[int, int]) -> ImageBatch:
        """Image score and smoothed anomaly map [B, *size] from the outputs."""
        score = output.image_logits.float().softmax(dim=-1)[:, utpa.ANOMALOUS_STATE]
        probabilities = [p.float() for p in output.probabilities]
        return ImageBatch(
            score, utpa.smoothed_anomaly_map(probabilities, grid=output.grid, size=size, sigma=self.config.sigma)
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode, any size) -> the normalised float tensor [3, S, S] this model takes, S its input size
        (`config.image_size`, the checkpoint's): `vip2clip.preprocess(image, image_size=S)`. Stack them for
        `predict`: `model.predict(torch.stack([model.preprocess(image) for image in images]))`."""
        return preprocessing.preprocess(image, self.config.image_size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor | np.ndarray, return_features: bool = False) -> ImageBatch:
        """images [B, 3, H, W] (tensor or float32 array), normalised with the OpenAI mean/std -> ImageBatch of
        tensors (no gradients); with `return_features` it carries the encoder's outputs too (one encoder pass
        serves both)."""
        with self._evaluating():
            features, _, prediction = self._infer(images)
            if return_features:
                prediction.features = features
            return prediction

    @torch.no_grad()
    def explain(self, images: torch.Tensor | np.ndarray) -> Explanation:
        """The paper's explanatory pictures as arrays (`vip2clip.model.explain`): per tapped layer the FGP
        attention of the two prompts (Fig. 3) and the anomaly map (Fig. 7), beside the fused map and the score
        that `predict` gives. images: as `predict`."""
        with self._evaluating():
            features, output, prediction = self._infer(images)
            attention = fgp_attention(self.fgp, output.text, features=features)
            return make_explanation(
                prediction.pred_score,
                prediction.anomaly_map,
                probabilities=output.probabilities,
                attention=attention,
                layers=self.feature_layers,
                grid=output.grid,
                sigma=self.config.sigma,
            )

    def _infer(self, images: torch.Tensor | np.ndarray) -> tuple[ImageFeatures, ForwardOutput, ImageBatch]:
        images = torch.as_tensor(images)
        features = self.encode_image(images.to(next(self.parameters()).device))
        output = self.forward_features(features)
        return features, output, self.prediction_from_output(output, tuple(images.shape[-2:]))

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode for the block, the previous mode restored after it."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint needs: the learnable prompt/FGP weights and the prompt buffers."""
        return {
            key: value.detach().cpu() for key, value in self.state_dict().items() if not key.startswith("backbone.")
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `trainable_state_dict`, with one clear error for every mismatched key or shape."""
        own = self.trainable_state_dict()
        for state_name in ("normal", "anomalous"):
            parts = [f"prompts.{kind}_{state_name}" for kind in ("prefix", "state", "suffix", "tokens")]
            if all(part in state for part in parts):  # the state word's token count may differ from ours
                prefix, word, suffix, tokens = (state[part].to(own[part].device) for part in parts)
                self.prompts.set_buffers(state_name, prefix=prefix, word=word, suffix=suffix, tokens=tokens)
        problem = state_mismatch(self.trainable_state_dict(), state)
        if problem:
            raise ValueError(f"checkpoint does not fit the model: {problem}")
        self.load_state_dict(state, strict=False)
