"""Blinded, verified offload (partition/blind, runtime/blinded): exactness, masking, verification, sealed masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml.errors import InputError, MaskError, ServiceUnavailable, VerificationError
from sealedml.partition.blind.check import blinded_matches_quantized, front_outputs, local_blinded
from sealedml.partition.blind.field import PRIME, centered, random_field
from sealedml.partition.blind.linear import apply_linear, find_linear_layers, layer_from_artifact
from sealedml.partition.graph import PartitionError
from sealedml.partition.split import load_partition, split_model
from sealedml.runtime.blinded import LocalLinearExecutor


def _small_cnn(seed: int = 0, wide: int = 1) -> onnx.ModelProto:
    """Conv → Relu | Conv(stride 2) → Relu → depthwise Conv → Add → MaxPool → Flatten → Gemm(transB) → Relu →
    MatMul | Relu → Gemm → Softmax: every kind of outsourced layer and a residual connection."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3 * wide).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "dw.w"], ["dw"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Add", ["dw", "r2"], ["res"]),
        helper.make_node("MaxPool", ["res"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "g1.w", "g1.b"], ["g1"], transB=1, alpha=0.5),
        helper.make_node("Relu", ["g1"], ["r3"]),
        helper.make_node("MatMul", ["r3", "m1.w"], ["m1"]),
        helper.make_node("Relu", ["m1"], ["r4"]),
        helper.make_node("Gemm", ["r4", "g2.w", "g2.b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    inits = [
        init("c1.w", 4, 1, 3, 3),
        init("c1.b", 4),
        init("c2.w", 8, 4, 3, 3),
        init("c2.b", 8),
        init("dw.w", 8, 1, 3, 3),
        init("g1.w", 16, 32),
        init("g1.b", 16),
        init("m1.w", 16, 12),
        init("g2.w", 12, 10),
        init("g2.b", 10),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def partition():  # type: ignore[no-untyped-def]
    return split_model(_small_cnn(), ["r1"], ["r4"], blind=(8, 8))


def _images(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)}


class Recording:
    """An honest executor that keeps what it is sent."""

    name = "recording"

    def __init__(self, layers) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.seen = LocalLinearExecutor(layers), []

    def compute(self, layer: int, blinded: np.ndarray) -> np.ndarray:
        self.seen.append((layer, blinded.copy()))
        return self.inner.compute(layer, blinded)

    def close(self) -> None:
        pass


class Faulty:
    """Alters one element of one layer's product, in one of several ways."""

    def __init__(self, layers, layer: int, kind: str, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.layer, self.kind, self.rng = LocalLinearExecutor(layers), layer, kind, rng
        self.name, self.closed = f"faulty-{kind}", False

    def compute(self, layer: int, blinded: np.ndarray) -> np.ndarray:
        y = self.inner.compute(layer, blinded)
        if layer != self.layer:
            return y
        i = int(self.rng.integers(y.size))
        if self.kind == "add":
            y.flat[i] += float(self.rng.integers(1, PRIME)) * self.rng.choice([-1.0, 1.0])
        elif self.kind == "one":
            y.flat[i] += 1.0
        elif self.kind == "replace":
            new = float(self.rng.integers(-(2**40), 2**40))
            y.flat[i] = new if (new - y.flat[i]) % PRIME else new + 1
        elif self.kind == "nan":
            y.flat[i] = np.nan
        elif self.kind == "fraction":
            y.flat[i] += 0.5
        elif self.kind == "shape":
            y = y[:, :-1]
        elif self.kind == "reuse":  # answers a product of another input: the classic lazy executor
            y = self.inner.compute(layer, np.zeros_like(blinded))
        return y

    def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------------ field and layers


def test_random_field_is_in_range_and_not_constant():
    values = random_field((100_000,))
    assert values.min() >= 0 and values.max() < PRIME
    assert len(np.unique(values)) > 99_000
    counts = np.bincount(values * 16 // PRIME, minlength=16)
    assert counts.min() > 100_000 / 16 * 0.9  # uniform over 16 bins, within 10 %


@pytest.mark.parametrize("limit", [2**20, 2**40, 2**62 - 1])
def test_mersenne_reduction_equals_numpys_mod(limit):
    from sealedml.partition.blind.field import reduce

    values = np.random.default_rng(limit % 97).integers(-limit, limit, 200_000)
    edges = np.array([0, 1, -1, PRIME, -PRIME, PRIME - 1, PRIME + 1, 2 * PRIME, 2**31, -(2**31), 2**62 - 1, 1 - 2**62])
    for v in (values, edges):
        assert np.array_equal(reduce(v), np.mod(v, PRIME))


def test_centered_maps_into_the_half_open_interval():
    v = centered(np.array([0, 1, PRIME - 1, PRIME // 2, PRIME // 2 + 1, -5, 3 * PRIME + 2]))
    assert v.tolist() == [0, 1, -1, PRIME // 2, -(PRIME // 2), -5, 2]


def test_conv_of_every_kind_matches_onnxruntime(partition):
    import onnxruntime as ort

    for layer in find_linear_layers(partition.middle):
        if layer.op != "conv":
            continue
        shape = (2, layer.weight.shape[1] * layer.group, 4, 4)
        x = np.random.default_rng(0).integers(-50, 50, shape).astype(np.float64)
        node = helper.make_node(
            "Conv", ["x", "w"], ["y"], pads=list(layer.pads), strides=list(layer.strides), group=layer.group
        )
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(layer.weight.astype(np.float32), "w")],
        )
        sess = ort.InferenceSession(
            helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
        )
        np.testing.assert_array_equal(apply_linear(layer, x), sess.run(None, {"x": x.astype(np.float32)})[0])


def test_executor_artifacts_describe_the_layers(partition):
    layers = find_linear_layers(partition.middle)
    assert [layer.op for layer in layers] == ["conv", "conv", "matmul", "matmul"]
    for layer, spec in zip(layers, partition.manifest.blind.layers, strict=True):
        parsed = layer_from_artifact(partition.artifacts[f"linear-{spec.index}.onnx"])
        np.testing.assert_array_equal(parsed.weight, layer.weight)
        assert (parsed.strides, parsed.pads, parsed.group) == (layer.strides, layer.pads, layer.group)
        assert np.abs(layer.weight).max() <= 127 and np.array_equal(layer.weight, np.rint(layer.weight))


# ------------------------------------------------------------------ exactness and accuracy


def test_blinded_outputs_equal_the_quantized_models_exactly(partition):
    assert blinded_matches_quantized(partition, _images(8))
    middle = local_blinded(partition)
    try:
        crossing = front_outputs(partition, _images(3, seed=5))
        got = middle.run(crossing)["r4"]
        assert np.array_equal(got, middle.reference(crossing)["r4"])
        # the quantized model is close to, but not the same as, the float one
        from sealedml.partition.split import run_parts

        whole = run_parts(split_model(_small_cnn(), ["r1"], ["r4"]), _images(3, seed=5))
        assert not np.array_equal(got, whole)
    finally:
        middle.close()


def test_split_blind_keeps_the_middle_in_the_tee_and_writes_artifacts(partition, tmp_path):
    manifest = partition.manifest
    assert manifest.parts["middle"].runs_in == "tee"
    assert [layer.node for layer in manifest.blind.layers] == ["c2", "dw", "g1", "m1"]
    assert manifest.boundary_bytes_per_sample == 8 * sum(
        int(np.prod(s.input_shape)) + int(np.prod(s.output_shape)) for s in manifest.blind.layers
    )
    written = {p.name for p in partition.write(tmp_path)}
    assert {"linear-0.onnx", "linear-3.onnx", "middle.onnx", "partition.json"} <= written
    assert load_partition(tmp_path).manifest == manifest
    (tmp_path / "linear-2.onnx").write_bytes(b"\0" + (tmp_path / "linear-2.onnx").read_bytes())
    with pytest.raises(PartitionError, match=r"linear-2\.onnx does not match"):
        load_partition(tmp_path)


def test_split_blind_refuses_layers_that_cannot_be_exact():
    with pytest.raises(PartitionError, match="would not decode uniquely"):
        split_model(_small_cnn(), ["r1"], ["r4"], blind=(16, 16))
    with pytest.raises(PartitionError, match="between 2 and 16"):
        split_model(_small_cnn(), ["r1"], ["r4"], blind=(1, 8))


def test_digits_accuracy_within_one_point_of_float():
    pytest.importorskip("torch")
    from sealedml.partition.split import _session
    from sealedml.zoo import trained

    victim = trained.load("digits-cnn")
    partition = split_model(victim.model, ["relu1"], ["relu4"], blind=(8, 8))
    middle = local_blinded(partition)
    back = _session(partition.back)
    try:
        crossing = front_outputs(partition, {"input": victim.x_test})
        probabilities = back.run(["probabilities"], middle.run(crossing))[0]
    finally:
        middle.close()
    blinded = float((probabilities.argmax(1) == victim.y_test).mean())
    assert len(victim.y_test) >= 400
    assert abs(blinded - victim.test_accuracy) <= 0.01, (blinded, victim.test_accuracy)


# ------------------------------------------------------------------ what the executor sees


def test_identical_requests_give_the_executor_unrelated_inputs(partition):
    layers = find_linear_layers(partition.middle)
    recorder = Recording(layers)
    middle = local_blinded(partition, [recorder])
    crossing = front_outputs(partition, _images(1))
    try:
        middle.run(crossing)
        middle.run(crossing)
    finally:
        middle.close()
    first, second = recorder.seen[: len(layers)], recorder.seen[len(layers) :]
    for (la, a), (lb, b) in zip(first, second, strict=True):
        assert la == lb and a.shape == b.shape
        assert np.mean(a == b) < 0.01  # equal only by chance (1/p per element)
        assert np.all(np.abs(a) <= PRIME // 2) and np.array_equal(a, np.rint(a))


def test_what_the_executor_sees_does_not_depend_on_the_input(partition):
    """Blinded inputs of all-zero and of large inputs are alike: uniform over Z_p, uncorrelated with x."""
    layers = find_linear_layers(partition.middle)
    recorder = Recording(layers)
    middle = local_blinded(partition, [recorder])
    zeros = {"r1": np.zeros((64, 4, 8, 8), np.float32)}
    large = {"r1": np.abs(np.random.default_rng(3).standard_normal((64, 4, 8, 8))).astype(np.float32) * 100}
    try:
        middle.run(zeros)
        middle.run(large)
    finally:
        middle.close()
    a, b = recorder.seen[0][1].ravel(), recorder.seen[len(layers)][1].ravel()
    for values in (a, b):
        counts = np.bincount(((values + PRIME // 2) * 8 // PRIME).astype(np.int64), minlength=8)
        expected = values.size / 8
        assert ((counts - expected) ** 2 / expected).sum() < 30  # chi-square, 7 degrees of freedom
    assert abs(np.corrcoef(b, large["r1"].ravel())[0, 1]) < 0.05


# ------------------------------------------------------------------ verification


@pytest.mark.parametrize("kind", ["add", "one", "replace", "nan", "fraction", "shape", "reuse"])
def test_every_kind_of_altered_product_is_detected(partition, kind):
    layers = find_linear_layers(partition.middle)
    rng = np.random.default_rng(0)
    crossing = front_outputs(partition, _images(2))
    for target in range(len(layers)):
        faulty = Faulty(layers, target, kind, rng)
        middle = local_blinded(partition, [faulty, LocalLinearExecutor(layers)])
        try:
            with pytest.raises(VerificationError):
                middle.run(crossing)
            assert faulty.closed and middle.stats.executors_replaced == 1
            assert np.array_equal(middle.run(crossing)["r4"], middle.reference(crossing)["r4"])  # the spare
        finally:
            middle.close()


def test_a_thousand_altered_products_are_all_detected(partition):
    """1,000 trials, each altering one random element of one random layer's product by a random amount."""
    layers = find_linear_layers(partition.middle)
    rng = np.random.default_rng(42)
    crossing = front_outputs(partition, _images(1))
    middle = local_blinded(partition, [])
    detected = 0
    for _ in range(1000):
        middle.set_executors([Faulty(layers, int(rng.integers(len(layers))), "add", rng)])  # a fresh faulty executor
        try:
            middle.run(crossing)
        except VerificationError:
            detected += 1
    middle.close()
    assert detected == 1000 and middle.stats.faults_detected == 1000


def test_without_executors_left_requests_fail_closed(partition):
    layers = find_linear_layers(partition.middle)
    middle = local_blinded(partition, [Faulty(layers, 0, "one", np.random.default_rng(0))])
    crossing = front_outputs(partition, _images(1))
    try:
        with pytest.raises(VerificationError):
            middle.run(crossing)
        with pytest.raises(ServiceUnavailable, match="none is left"):
            middle.run(crossing)
    finally:
        middle.close()


def test_an_input_of_the_wrong_shape_is_the_callers_error(partition):
    middle = local_blinded(partition)
    try:
        with pytest.raises(InputError):
            middle.run({"r1": np.zeros((1, 4, 6, 6), np.float32)})
        assert middle.stats.executors_replaced == 0
    finally:
        middle.close()


# ------------------------------------------------------------------ sealed masks


def _pool(partition, tmp_path: Path):  # type: ignore[no-untyped-def]
    middle = local_blinded(partition, masks_dir=tmp_path / "masks")
    middle.masks.precompute(3)
    return middle, sorted((tmp_path / "masks").glob("*.mask"))


def test_masks_are_sealed_used_once_and_deleted(partition, tmp_path):
    middle, files = _pool(partition, tmp_path)
    assert len(files) == 3
    r0 = middle.masks.take(1)[0][0]
    assert not files[0].exists() and middle.masks.available == 2
    assert r0.astype("<u4").tobytes()[:64] not in files[1].read_bytes()  # sealed, not plain
    middle.masks.take(2)
    assert middle.masks.take(1)[0][0].shape == r0.shape and middle.masks.stats.made_on_demand == 1
    middle.close()


@pytest.mark.parametrize("attack", ["tamper", "swap", "replay", "delete"])
def test_an_altered_mask_store_is_refused(partition, tmp_path, attack):
    middle, files = _pool(partition, tmp_path)
    if attack == "tamper":
        data = bytearray(files[0].read_bytes())
        data[10] ^= 1
        files[0].write_bytes(bytes(data))
    elif attack == "swap":
        a, b = files[0].read_bytes(), files[1].read_bytes()
        files[0].write_bytes(b)
        files[1].write_bytes(a)
    elif attack == "replay":
        kept = files[0].read_bytes()
        middle.masks.take(1)
        files[1].write_bytes(kept)  # an old record put back under the next number
    else:
        files[0].unlink()
    try:
        with pytest.raises(MaskError):
            middle.masks.take(1)
    finally:
        middle.close()


def test_closing_removes_the_mask_directory(partition, tmp_path):
    middle, _ = _pool(partition, tmp_path)
    middle.close()
    assert not (tmp_path / "masks").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
