"""The leakage metric of Gu et al. ("Confidential Inference via Ternary Model Partitioning"), reported faithfully.

Every channel of an IR is turned into an image the size of the input — resized bilinearly,
min-max rescaled to the input's value range, replicated over the input's channels — and fed
through the *same* whole model F (ONNX Runtime). For test input x and channel j:

* d_j = KL(F(x) ‖ F(IR_j)), how differently the model sees the channel image;
* δ = KL(F(x) ‖ uniform), the divergence of a guess that knows nothing.

A channel with d_j < δ "looks like" the input to the model; Gu et al. call a cut safe when the
most similar channels stay at d ≥ δ. Reported per cut: the fraction of test inputs whose d_min
(the minimum over all channels) is below δ, and the median of d_min / δ.

The metric tests class semantics, not reconstruction, and the minimum over dozens of channels
is a multiple-comparisons test: on the digits CNN it flags nearly every input at every conv cut
(docs/partition.md). It is undefined for IRs without spatial channels (fully connected layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from sealedml.partition.assess.cuts import run_onnx

__all__ = ["GuResult", "channel_images", "class_probabilities", "gu_metric", "kl_divergence"]

_EPS = 1e-12


@dataclass(frozen=True)
class GuResult:
    """Gu et al.'s metric at one cut.

    Attributes:
        channels: IR channels turned into images (all 4-D tensors of the cut).
        below_delta: fraction of test inputs with d_min < δ (the input "leaks" by Gu's rule).
        median_ratio: median over test inputs of d_min / δ.
    """

    channels: int
    below_delta: float
    median_ratio: float

    def to_dict(self) -> dict[str, float | int]:
        """The result, rounded for reports."""
        return {
            "channels": self.channels,
            "below_delta": round(self.below_delta, 4),
            "median_ratio": round(self.median_ratio, 4),
        }


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """``outputs`` as class distributions: kept when they already are (rows ≥ 0 summing to 1), else softmax."""
    out = outputs.astype(np.float64)
    if np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        return np.asarray(out / out.sum(axis=1, keepdims=True))
    shifted = np.exp(out - out.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) row by row, in nats (zero-probability terms of p contribute nothing)."""
    p = np.clip(p, 0.0, 1.0)
    q = np.clip(q, _EPS, 1.0)
    terms = np.where(p > 0, p * (np.log(np.clip(p, _EPS, 1.0)) - np.log(q)), 0.0)
    return np.asarray(terms.sum(axis=-1))


def channel_images(ir: np.ndarray, sample_shape: tuple[int, ...], value_range: tuple[float, float]) -> np.ndarray:
    """Each channel of ``ir`` ``[n, c, h, w]`` as an input image: ``[n, c, *sample_shape]``.

    Bilinear resize to the input's height and width, min-max rescale of each channel image to
    ``value_range`` (a constant channel becomes the middle of the range), replication over the
    input's channels.
    """
    n, c = ir.shape[:2]
    channels, height, width = sample_shape
    flat = torch.from_numpy(np.array(ir, dtype=np.float32, copy=True)).reshape(n * c, 1, *ir.shape[2:])
    resized = F.interpolate(flat, size=(height, width), mode="bilinear", align_corners=False).numpy()
    resized = resized.reshape(n, c, height, width).astype(np.float64)
    low, high = value_range
    lo = resized.min(axis=(2, 3), keepdims=True)
    span = resized.max(axis=(2, 3), keepdims=True) - lo
    scaled = np.where(span > 0, (resized - lo) / np.where(span > 0, span, 1.0), 0.5) * (high - low) + low
    return np.repeat(scaled[:, :, None], channels, axis=2).astype(np.float32)


def gu_metric(
    model: onnx.ModelProto,
    input_name: str,
    x: np.ndarray,
    irs: list[np.ndarray],
    value_range: tuple[float, float],
) -> GuResult | None:
    """Gu et al.'s KL metric at a cut whose tensors' values on ``x`` are ``irs``.

    Args:
        model: the whole model F.
        input_name: its input.
        x: test inputs ``[n, C, H, W]``.
        irs: the cut's tensors on ``x``; those of rank 4 ``[n, c, h, w]`` have channels.
        value_range: the inputs' ``(low, high)``.

    Returns:
        The metric, or None when no tensor of the cut has spatial channels.
    """
    spatial = [ir for ir in irs if ir.ndim == 4]
    if not spatial:
        return None
    reference = run_onnx(model, {input_name: x})[0]
    p = class_probabilities(reference)
    delta = kl_divergence(p, np.full_like(p, 1.0 / p.shape[1]))
    d_min = np.full(len(x), np.inf)
    channels = 0
    for ir in spatial:
        images = channel_images(ir, tuple(x.shape[1:]), value_range)
        n, c = images.shape[:2]
        channels += c
        out = run_onnx(model, {input_name: images.reshape(n * c, *x.shape[1:])})[0]
        q = class_probabilities(out).reshape(n, c, -1)
        d = kl_divergence(p[:, None, :], q)
        d_min = np.minimum(d_min, d.min(axis=1))
    ratio = d_min / np.maximum(delta, _EPS)
    return GuResult(channels, float(np.mean(d_min < delta)), float(np.median(ratio)))
