"""``sealedml partition assess`` end to end on the digits CNN (reduced settings), and its one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from sealedml.cli.main import main
from sealedml.zoo.trained import TrainedModel

from .conftest import image, make_model, residual_model, vector

REDUCED = ["--samples", "30", "--iterations", "30", "--inverse-steps", "60", "--shadow-steps", "30"]


@pytest.fixture(scope="module")
def files(digits: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model and both splits, written by ``zoo export`` as a user would."""
    folder = tmp_path_factory.mktemp("assess")
    paths = {"model": folder / "digits.onnx", "data": folder / "test.npz", "aux": folder / "aux.npz"}
    argv = ["zoo", "export", "digits-cnn", "--out", str(paths["model"])]
    assert main([*argv, "--data", str(paths["data"]), "--aux", str(paths["aux"]), "--json"]) == 0
    return paths


def _assess(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "partition",
        "assess",
        str(files["model"]),
        "--data",
        str(files["data"]),
        "--aux",
        str(files["aux"]),
        *extra,
    ]


@pytest.mark.slow
def test_json_report_and_plot(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    figure = tmp_path / "leak.png"
    argv = _assess(files, "--cuts", "relu1,relu4,logits", *REDUCED, "--seed", "1", "--plot", str(figure), "--json")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # progress lines are suppressed with --json
    report = json.loads(captured.out)
    assert {"cuts", "chosen_front", "chosen_back", "baselines", "settings", "timings", "total_seconds"} <= set(report)
    assert [row["cut"] for row in report["cuts"]] == ["relu1", "relu4", "logits"]
    for row in report["cuts"]:
        assert set(row["attacks"]) == {"rmle", "inverse", "query_free"}
        assert {"ssim", "psnr", "mse", "reid"} <= set(row["attacks"]["rmle"])
        assert {"gu", "label_probe", "readout", "within_margin", "passes"} <= set(row)
    assert report["cuts"][0]["gu"]["channels"] == 16 and report["cuts"][1]["gu"] is None
    assert report["cuts"][2]["readout"] == 1.0  # the logits give the label by argmax
    assert report["chosen_back"] == "relu4" and report["back_decision"]["criterion"] == "direct readout"
    assert report["chosen_front"] is None or report["chosen_front"] in {"relu4", "logits"}
    assert report["front_decision"]["reason"]
    assert report["settings"]["seed"] == 1 and report["settings"]["rmle_iterations"] == 30
    assert report["settings"]["margin"] == {"ssim": 0.05, "reid": 0.05}
    assert report["total_seconds"] > 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == str(figure)


@pytest.mark.slow
def test_human_output_is_a_table_with_progress_on_stderr(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(_assess(files, "--cuts", "pool2", *REDUCED, "--margin", "1")) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("[1/1] pool2")
    lines = captured.out.splitlines()
    assert lines[0].split()[:2] == ["cut", "IR"] and lines[2].startswith("pool2")
    assert "front cut: pool2" in captured.out  # a margin of 1 lets any cut pass
    assert "total" in lines[-1]


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_missing_files_are_one_line_errors(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nope.npz")
    assert "no such file" in _error(capsys, [*_assess(files)[:3], "--data", missing, "--aux", str(files["aux"])])
    no_model = ["partition", "assess", str(tmp_path / "m.onnx"), "--data", missing, "--aux", missing]
    assert "m.onnx: no such file" in _error(capsys, no_model)
    assert "--aux" in _error(capsys, ["partition", "assess", str(files["model"]), "--data", str(files["data"])])


def test_npz_without_x_or_with_the_wrong_shape_is_refused(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_x = tmp_path / "no_x.npz"
    np.savez(no_x, inputs=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    argv = _assess(files)
    argv[4] = str(no_x)
    assert "no array 'x'" in _error(capsys, argv)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    argv[4] = str(wrong)
    assert "the model takes (1, 8, 8)" in _error(capsys, argv)
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((4, 1, 8, 8), np.float32), y=np.full(4, 12, np.int64))
    argv[4] = str(labels)
    assert "labels must be in 0..9" in _error(capsys, argv)


def test_bad_cuts_and_margins_are_refused(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert "no tensor 'nope'" in _error(capsys, _assess(files, "--cuts", "nope"))
    assert "model's own input" in _error(capsys, _assess(files, "--cuts", "input"))
    assert "--margin" in _error(capsys, _assess(files, "--margin", "ssim=2"))
    assert "--samples" in _error(capsys, _assess(files, "--samples", "1"))


def test_a_cut_that_does_not_separate_the_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path, data = tmp_path / "residual.onnx", tmp_path / "data.npz"
    onnx.save(residual_model(), str(model_path))
    np.savez(data, x=np.random.default_rng(0).uniform(0, 1, (6, 1, 8, 8)).astype(np.float32), y=np.arange(6) % 3)
    argv = ["partition", "assess", str(model_path), "--data", str(data), "--aux", str(data), "--cuts", "ra,rb"]
    err = _error(capsys, argv)
    assert "cut rb does not separate the model" in err and "ra" in err


def test_an_operator_the_translator_lacks_is_refused_before_any_attack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = [
        helper.make_node("Relu", ["input"], ["r"]),
        helper.make_node("Einsum", ["r"], ["e"], equation="nchw->nc"),
        helper.make_node("Softmax", ["e"], ["probabilities"], axis=1),
    ]
    model_path, data = tmp_path / "einsum.onnx", tmp_path / "data.npz"
    onnx.save(make_model(nodes, [image("input", 2, 4)], [vector("probabilities", 2)], {}), str(model_path))
    np.savez(data, x=np.random.default_rng(0).uniform(0, 1, (6, 2, 4, 4)).astype(np.float32), y=np.arange(6) % 2)
    argv = ["partition", "assess", str(model_path), "--data", str(data), "--aux", str(data), "--cuts", "r"]
    assert "operator Einsum" in _error(capsys, argv)
