"""Scores, re-identification, baselines and the label probe on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from sealedml.partition.assess.metrics import (
    PSNR_CAP_DB,
    image_scores,
    label_probe,
    mean_images,
    readout_agreement,
    reidentification,
)


def _images(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)


def test_a_perfect_reconstruction_scores_perfectly() -> None:
    x = _images()
    scores = image_scores(x.copy(), x, (0.0, 1.0))
    assert scores.ssim == pytest.approx(1.0)
    assert scores.psnr == PSNR_CAP_DB
    assert scores.mse == 0.0
    assert scores.reid == 1.0


def test_reidentification_counts_who_is_nearest() -> None:
    x = _images()
    assert reidentification(x + 0.01, x) == 1.0
    assert reidentification(np.roll(x, 1, axis=0), x) == 0.0  # each points at its neighbour
    half = x.copy()
    half[:6] = np.roll(x[:6], 1, axis=0)
    assert reidentification(half, x) == 0.5


def test_the_dataset_mean_baseline_identifies_one_input_in_n() -> None:
    """The same guess for every input is nearest to exactly one of them."""
    x = _images(20)
    y = np.arange(20) % 4
    dataset_mean, _ = mean_images(x, y, y, 4)
    assert reidentification(dataset_mean, x) == pytest.approx(1 / 20)


def test_class_mean_baseline_uses_the_true_class() -> None:
    aux = np.stack([np.full((1, 2, 2), v, np.float32) for v in (0.0, 0.2, 1.0, 0.8)])
    y_aux = np.array([0, 0, 1, 1])
    y_test = np.array([1, 0, 2])  # class 2 is absent from the auxiliary data: the dataset mean stands in
    dataset_mean, class_mean = mean_images(aux, y_aux, y_test, 3)
    assert np.allclose(dataset_mean, 0.5)
    assert np.allclose(class_mean[0], 0.9) and np.allclose(class_mean[1], 0.1) and np.allclose(class_mean[2], 0.5)


def test_class_mean_baseline_reidentifies_one_input_per_class() -> None:
    """Classes far apart: each class mean is nearest to one member of its class, so re-id = classes / n."""
    rng = np.random.default_rng(3)
    centers = np.array([0.1, 0.5, 0.9])
    y = np.repeat(np.arange(3), 5)
    x = (centers[y][:, None, None, None] + rng.normal(0, 0.02, (15, 1, 4, 4))).astype(np.float32)
    _, class_mean = mean_images(x, y, y, 3)
    assert reidentification(class_mean, x) == pytest.approx(3 / 15)


def test_label_probe_reads_a_separable_label_and_not_noise() -> None:
    rng = np.random.default_rng(4)
    y_aux, y_test = rng.integers(0, 2, 200), rng.integers(0, 2, 100)
    signal_aux = rng.normal(0, 1, (200, 8)) + 3 * y_aux[:, None]
    signal_test = rng.normal(0, 1, (100, 8)) + 3 * y_test[:, None]
    assert label_probe(signal_aux, y_aux, signal_test, y_test) >= 0.95
    assert label_probe(rng.normal(0, 1, (200, 8)), y_aux, rng.normal(0, 1, (100, 8)), y_test) <= 0.7


def test_readout_only_for_class_shaped_irs() -> None:
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    assert readout_agreement(logits, np.array([0, 1]), 3) == 1.0
    assert readout_agreement(logits, np.array([0, 2]), 3) == 0.5
    assert readout_agreement(logits, np.array([0, 1]), 4) is None
    assert readout_agreement(np.zeros((2, 3, 2, 2)), np.array([0, 1]), 3) is None
