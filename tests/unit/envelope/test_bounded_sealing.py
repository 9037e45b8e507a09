"""Sealing from an .onnx file holds about one tensor, not the model several times over; the container is
the same as sealing the loaded model, and the file is never loaded whole."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml import zoo
from sealedml.envelope.model_container import open_model, seal_model
from sealedml.envelope.onnx_file import payload_of_file
from sealedml.envelope.seal_file import seal_model_file
from sealedml.envelope.sealing import OnnxPayload
from sealedml.errors import SealedModelError

KEY = bytes(range(32))


@pytest.mark.parametrize("name", ["toy", "digits", "mobilenetv2"])
def test_the_file_payload_equals_the_loaded_models(tmp_path: Path, name: str) -> None:
    model = zoo.get(name)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    from_file, close = payload_of_file(path)
    try:
        assert b"".join(bytes(p) for p in from_file.pieces()) == b"".join(
            bytes(p) for p in OnnxPayload.of_model(model).pieces()
        )
    finally:
        close()
    sealed = tmp_path / "m.sealed"
    size, _ = seal_model_file(sealed, path, model_id="m", model_version=1, model_key=KEY)
    assert sealed.stat().st_size == size
    opened = open_model(sealed, KEY, expected_model_id="m", expected_version=1)
    assert (
        opened.SerializeToString()
        == open_model(
            _write(tmp_path / "b.sealed", seal_model(model, model_id="m", model_version=1, model_key=KEY)),
            KEY,
            expected_model_id="m",
            expected_version=1,
        ).SerializeToString()
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_progress_is_reported_up_to_the_whole_payload(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(zoo.get("mobilenetv2"), path)
    seen: list[tuple[int, int]] = []
    seal_model_file(
        tmp_path / "m.sealed",
        path,
        model_id="m",
        model_version=1,
        model_key=KEY,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert len(seen) > 10 and seen[-1][0] == seen[-1][1] and all(a[0] < b[0] for a, b in itertools.pairwise(seen))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\x0a\x05abc", "runs past"), (b"\xff" * 12, "varint"), (b"\x08\x01", "no graph")],
)
def test_a_file_that_is_not_a_model_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(SealedModelError, match=message):
        payload_of_file(path)


def test_external_data_in_the_file_is_refused(tmp_path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight],
    )
    path = tmp_path / "ext.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(SealedModelError, match="external data"):
        payload_of_file(path)


def test_sealing_a_125_mb_model_holds_about_one_tensor(tmp_path: Path) -> None:
    """Measured in a process of its own: the peak resident memory above what the imports take."""
    size = 125 * 10**6
    weight = np.random.default_rng(0).standard_normal((6250, 5000)).astype(np.float32)
    assert weight.nbytes == size
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6250])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5000])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph), path)
    del weight, graph
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from sealedml.envelope.seal_file import seal_model_file\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"seal_model_file(Path({str(tmp_path / 'big.sealed')!r}), Path({str(path)!r}), model_id='b', model_version=1, "
        "model_key=bytes(32))\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip())
    assert grown < 1.5 * size, f"sealing grew the process by {grown / size:.2f}× the model"
    assert (tmp_path / "big.sealed").stat().st_size > size
