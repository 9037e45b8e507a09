"""The trained victims: real accuracy, disjoint splits, names in the zoo, and ``zoo export`` of model and data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sealedml import zoo
from sealedml.cli.main import main
from sealedml.cli.zoo import TRAINED
from sealedml.errors import ConfigurationError
from sealedml.zoo import trained
from sealedml.zoo.trained import TrainedModel


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


def test_the_digits_cnn_is_accurate_and_its_splits_are_disjoint(digits: TrainedModel) -> None:
    assert digits.test_accuracy > 0.95
    assert (len(digits.y_train), len(digits.y_aux), len(digits.y_test)) == (898, 450, 449)
    assert digits.x_test.shape[1:] == (1, 8, 8) and digits.x_test.dtype == np.float32
    assert 0.0 <= digits.x_test.min() and digits.x_test.max() <= 1.0
    # Disjoint by sample (a few digits images are exact duplicates of each other, so compare counts).
    together = np.concatenate([digits.x_train, digits.x_aux, digits.x_test])
    assert len(_rows(together)) >= len(together) - 20
    assert [o.name for o in digits.model.graph.output] == ["probabilities"]
    assert {"relu1", "pool3", "relu4", "logits"} <= {n.output[0] for n in digits.model.graph.node}


def test_the_faces_cnn_separates_faces_from_non_faces(faces: TrainedModel) -> None:
    assert faces.test_accuracy >= 0.9
    assert (len(faces.y_train), len(faces.y_aux), len(faces.y_test)) == (100, 50, 50)
    assert faces.x_test.shape[1:] == (1, 25, 25)
    assert not (_rows(faces.x_aux) & _rows(faces.x_test)) and not (_rows(faces.x_train) & _rows(faces.x_test))
    assert np.bincount(faces.y_test).tolist() == [25, 25]


def test_each_call_returns_a_fresh_model(digits: TrainedModel) -> None:
    again = trained.digits_cnn(0)
    again.model.graph.name = "changed"
    assert trained.digits_cnn(0).model.graph.name == "digits_cnn"
    assert again.x_test is digits.x_test and not digits.x_test.flags.writeable


def test_the_zoo_builds_trained_models_by_name(digits: TrainedModel) -> None:
    assert zoo.get("digits-cnn").SerializeToString() == digits.model.SerializeToString()
    assert TRAINED == trained.NAMES
    with pytest.raises(ConfigurationError, match="digits-cnn"):
        zoo.get("nope")
    with pytest.raises(ConfigurationError, match="no trained zoo model"):
        trained.load("digits")


def test_zoo_export_writes_the_model_and_both_splits(
    digits: TrainedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, test, aux = tmp_path / "m.onnx", tmp_path / "test.npz", tmp_path / "aux.data"
    assert main(["zoo", "export", "digits-cnn", "--out", str(out), "--data", str(test), "--aux", str(aux)]) == 0
    assert out.read_bytes() == digits.model.SerializeToString()
    with np.load(test) as written:
        assert np.array_equal(written["x"], digits.x_test) and np.array_equal(written["y"], digits.y_test)
    with np.load(aux) as written:  # the name is kept as given
        assert np.array_equal(written["x"], digits.x_aux)
    assert "test_accuracy" in capsys.readouterr().out


def test_zoo_export_refuses_data_flags_for_untrained_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "export", "toy", "--out", str(tmp_path / "t.onnx"), "--data", str(tmp_path / "d.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --data exists for") and err.count("\n") == 1
