"""`Prediction`, what every inference engine returns: the torch model (`ViP2CLIP.predict`) and the ONNX engine
(`vip2clip.inference.onnx_engine`). Kept apart from the model so that the ONNX engine can use it without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from vip2clip.model.backbone import ImageFeatures


@dataclass
class Prediction:
    """pred_score [B]: anomalous probability; anomaly_map [B, H, W]: layer-averaged, Gaussian-smoothed map;
    features: the frozen encoder's outputs (patch tokens for reference images), only when asked for (torch model).

    torch tensors from the torch model, and from the ONNX engine when given a tensor; numpy arrays from the ONNX
    engine given numpy arrays.
    """

    pred_score: torch.Tensor | np.ndarray
    anomaly_map: torch.Tensor | np.ndarray
    features: ImageFeatures | None = None

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(pred_score, anomaly_map) as float32 numpy arrays, from tensors on any device or from arrays."""
        return _float32_array(self.pred_score), _float32_array(self.anomaly_map)


def _float32_array(values: torch.Tensor | np.ndarray) -> np.ndarray:
    import numpy as np  # the module itself stays import-light

    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)
