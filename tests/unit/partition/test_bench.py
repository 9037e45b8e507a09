"""``sealedml bench partition``: a short real run (executor process on loopback) and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealedml import zoo
from sealedml.bench.partition import run_partition
from sealedml.cli.main import main
from sealedml.partition.split import split_model


def test_a_short_run_reports_the_ratio_boundary_bytes_and_tee_share() -> None:
    result = run_partition("mobilenetv2", requests=3, warmup=1, device="cpu", quiet=True)
    manifest = split_model(zoo.get("mobilenetv2"), result["front_cut"], result["back_cut"]).manifest
    assert result["boundary_bytes"] == manifest.boundary_bytes_per_sample > 0
    assert 0 < result["tee_flops_share"] < 1
    assert result["tee_flops_share"] == round(manifest.tee_flops_share, 4)
    assert result["executor_device"] == "cpu"
    medians = result["median_ms"]
    assert result["ternary_over_all_in_tee"] == pytest.approx(medians["ternary"] / medians["all_in_tee"], rel=0.01)
    assert 0 < result["tee_time_share"] <= 1.5  # front+back medians over the ternary median
    assert result["target_met"] is None  # the target is set for ResNet-50 only


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "digits-cnn", "--front-cut", "relu1"], "--front-cut and --back-cut time a split"),
        (["--model", "mobilenetv2", "--plot", "x.png"], "--plot exists for the trained models only"),
        (["--model", "faces-cnn", "--plot", "x.pdf"], "give a .png file name"),
        (["--model", "resnet50", "--requests", "0"], "--requests must be ≥ 1"),
    ],
)
def test_bad_flags_are_one_line_errors(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "partition", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_an_unknown_front_cut_is_refused_before_any_process_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "partition", "--model", "mobilenetv2", "--front-cut", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err, err
