"""How close a reconstruction is to the input, what a guess without the IR scores, and what an IR says of the label.

* :func:`image_scores` — SSIM and PSNR (scikit-image) and MSE, averaged over images;
* :func:`reidentification` — the fraction of inputs whose reconstruction is nearer (L2) to them
  than to any other test input: the attack picks the victim out of the test set;
* :func:`mean_images` — the two baselines every attack is shown beside: the attacker's dataset-mean
  image (no IR, no label) and its class-mean image (no IR, but the true label: what the model's
  output would add, and what keeping the back part in the TEE hides);
* :func:`label_probe` — the accuracy of a logistic regression trained on the attacker's IRs;
* :func:`readout_agreement` — whether argmax over an IR's features already is the model's label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "PSNR_CAP_DB",
    "ImageScores",
    "image_scores",
    "label_probe",
    "mean_images",
    "readout_agreement",
    "reidentification",
]

#: PSNR of a perfect reconstruction is infinite; it is reported as this cap instead (JSON has no inf).
PSNR_CAP_DB = 100.0


@dataclass(frozen=True)
class ImageScores:
    """Means over the test images of SSIM, PSNR (dB) and MSE, and the re-identification rate."""

    ssim: float
    psnr: float
    mse: float
    reid: float

    def to_dict(self) -> dict[str, float]:
        """The scores, rounded for reports."""
        return {k: round(v, 4) for k, v in asdict(self).items()}


def _ssim_one(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    from skimage import metrics

    structural_similarity: Any = metrics.structural_similarity  # untyped

    # SSIM's default 7x7 window does not fit tiny images: take the largest odd side that fits.
    side = min(7, *a.shape[1:])
    side -= 1 - side % 2
    if a.shape[0] == 1:
        return float(structural_similarity(a[0], b[0], data_range=data_range, win_size=side))
    return float(structural_similarity(a, b, data_range=data_range, win_size=side, channel_axis=0))


def _psnr_one(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    from skimage import metrics

    peak_signal_noise_ratio: Any = metrics.peak_signal_noise_ratio  # untyped

    return min(PSNR_CAP_DB, float(peak_signal_noise_ratio(a, b, data_range=data_range)))


def reidentification(reconstructions: np.ndarray, inputs: np.ndarray) -> float:
    """The fraction of ``inputs[i]`` for which ``reconstructions[i]`` is nearest (L2) to ``inputs[i]``.

    Args:
        reconstructions: ``[n, ...]``, one per input, same shape.
        inputs: ``[n, ...]``, the true test inputs (the candidate set).

    Returns:
        A rate in [0, 1]; a guess independent of the input scores 1/n. Ties go to the lowest index.
    """
    r = reconstructions.reshape(len(reconstructions), -1).astype(np.float64)
    x = inputs.reshape(len(inputs), -1).astype(np.float64)
    distances = (r**2).sum(1)[:, None] - 2.0 * r @ x.T + (x**2).sum(1)[None, :]
    return float(np.mean(np.argmin(distances, axis=1) == np.arange(len(r))))


def image_scores(reconstructions: np.ndarray, inputs: np.ndarray, value_range: tuple[float, float]) -> ImageScores:
    """Mean SSIM, PSNR and MSE of ``reconstructions`` against ``inputs``, and their re-identification rate.

    Args:
        reconstructions: ``[n, C, H, W]``.
        inputs: ``[n, C, H, W]``, the true inputs.
        value_range: the inputs' ``(low, high)``: SSIM's and PSNR's data range.

    Returns:
        The four numbers.
    """
    data_range = float(value_range[1] - value_range[0]) or 1.0
    ssim = [_ssim_one(x, r, data_range) for x, r in zip(inputs, reconstructions, strict=True)]
    psnr = [_psnr_one(x, r, data_range) for x, r in zip(inputs, reconstructions, strict=True)]
    mse = float(np.mean((reconstructions.astype(np.float64) - inputs) ** 2))
    return ImageScores(float(np.mean(ssim)), float(np.mean(psnr)), mse, reidentification(reconstructions, inputs))


def mean_images(
    x_aux: np.ndarray, y_aux: np.ndarray, y_test: np.ndarray, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The two baseline "reconstructions" of each test input, from the attacker's data alone.

    Returns:
        ``(dataset_mean, class_mean)``, each ``[len(y_test), *sample]``: the mean of all auxiliary
        images, and the mean of the auxiliary images of the test input's true class (the dataset
        mean for a class the auxiliary data lacks).
    """
    overall = x_aux.mean(axis=0)
    per_class = np.stack([x_aux[y_aux == c].mean(axis=0) if np.any(y_aux == c) else overall for c in range(classes)])
    dataset = np.broadcast_to(overall, (len(y_test), *overall.shape)).astype(np.float32)
    return dataset, per_class[y_test].astype(np.float32)


def label_probe(ir_aux: np.ndarray, y_aux: np.ndarray, ir_test: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy on the test IRs of a logistic regression trained on the attacker's auxiliary IRs.

    Features are standardized with the auxiliary statistics; a single auxiliary class gives
    the constant guess.
    """
    from sklearn.linear_model import LogisticRegression

    a = ir_aux.reshape(len(ir_aux), -1).astype(np.float64)
    t = ir_test.reshape(len(ir_test), -1).astype(np.float64)
    if len(np.unique(y_aux)) < 2:
        return float(np.mean(y_test == y_aux[0]))
    mean, std = a.mean(0), a.std(0)
    std[std == 0] = 1.0
    probe = LogisticRegression(max_iter=500)
    probe.fit((a - mean) / std, y_aux)
    return float(np.mean(probe.predict((t - mean) / std) == y_test))


def readout_agreement(ir_test: np.ndarray, predictions: np.ndarray, classes: int) -> float | None:
    """How often argmax over an IR's features equals the model's predicted label (None: not ``[n, classes]``).

    A tensor that agrees (nearly) always gives the label away by direct readout, without any training.
    """
    if ir_test.ndim != 2 or ir_test.shape[1] != classes:
        return None
    return float(np.mean(np.argmax(ir_test, axis=1) == predictions))
