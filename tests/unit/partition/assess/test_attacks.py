"""The attacks on the trained digits CNN: each leaks far above the baseline at the first conv cut, less at the deepest."""

from __future__ import annotations

from typing import Any

import pytest

from sealedml.partition.assess import ATTACKS, AttackSettings, Dataset, Settings, assess
from sealedml.zoo.trained import TrainedModel

# Reduced from the defaults (300 / 800 / 300 steps, 200 inputs) to keep the test at a few seconds.
REDUCED = AttackSettings(rmle_iterations=150, inverse_steps=300, shadow_steps=150)


@pytest.fixture(scope="module")
def report(digits: TrainedModel) -> dict[str, Any]:
    """relu1 (after the first conv) and relu4 (after fc1: the deepest cut before the logits, as in the brief)."""
    result = assess(
        digits.model,
        Dataset(digits.x_test, digits.y_test),
        Dataset(digits.x_aux, digits.y_aux),
        cuts=[["relu1"], ["relu4"]],
        settings=Settings(seed=0, samples=60, attacks=REDUCED),
    )
    return result.to_dict()


@pytest.mark.slow
def test_every_attack_beats_the_dataset_mean_baseline_at_the_first_conv_cut(report: dict[str, Any]) -> None:
    first = report["cuts"][0]
    assert first["cut"] == "relu1"
    baseline = report["baselines"]["dataset_mean"]
    assert baseline["reid"] == pytest.approx(1 / 60, abs=1e-3)  # one guess for all: nearest to one input
    for attack in ATTACKS:
        assert first["attacks"][attack]["reid"] > baseline["reid"] + 0.05, attack
        assert first["within_margin"][attack] is False
    # White-box and black-box reconstructions are nearly exact this early.
    assert first["attacks"]["rmle"]["ssim"] > 0.95 and first["attacks"]["inverse"]["ssim"] > 0.9
    assert first["attacks"]["rmle"]["reid"] == 1.0


@pytest.mark.slow
def test_every_attack_degrades_at_the_deepest_cut(report: dict[str, Any]) -> None:
    first, deepest = report["cuts"]
    assert deepest["cut"] == "relu4" and deepest["gu"] is None and "fully connected" in deepest["gu_note"]
    for attack in ATTACKS:
        assert deepest["attacks"][attack]["reid"] < first["attacks"][attack]["reid"], attack
    for attack in ("rmle", "inverse"):
        assert deepest["attacks"][attack]["ssim"] < first["attacks"][attack]["ssim"], attack
    # The rMLE optimum is far worse from a 64-d vector than from the first conv's 1,024 values.
    assert deepest["attacks"]["rmle"]["ssim"] < 0.8


@pytest.mark.slow
def test_the_label_is_visible_to_a_probe_at_every_cut(report: dict[str, Any]) -> None:
    for row in report["cuts"]:
        assert row["label_probe"] > report["majority_rate"] + 0.5
    assert report["model_accuracy"] > 0.9


def test_the_same_seed_gives_the_same_report(digits: TrainedModel) -> None:
    def run(seed: int) -> list[Any]:
        tiny = AttackSettings(rmle_iterations=20, inverse_steps=20, shadow_steps=10)
        result = assess(
            digits.model,
            Dataset(digits.x_test, digits.y_test),
            Dataset(digits.x_aux[:100], digits.y_aux[:100]),
            cuts=[["pool2"]],
            settings=Settings(seed=seed, samples=20, attacks=tiny),
        ).to_dict()
        return [{k: v for k, v in row.items() if k != "seconds"} for row in result["cuts"]]

    first = run(5)
    assert run(5) == first
    assert run(6) != first
