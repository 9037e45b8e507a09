"""A malicious owner's graph cannot read the runtime's files through ONNX external data.

ONNX tensors may keep their bytes in an external file; ONNX Runtime, given a
model from memory, resolves such a path against the working directory. A graph
whose ``Constant`` (or initializer, or subgraph, or sparse tensor) names a file
of the runtime — a platform root key, the KeyService's database — would copy
that file into the model's outputs. The owner seals the container with their
own tooling, so the runtime's checks, not the sealing code's, must refuse it:
these tests seal with the sealing code's own checks switched off, as a
malicious owner would.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml.envelope import model_container, sealing
from sealedml.envelope.model_container import SealedModelReader, open_model, seal_model
from sealedml.errors import SealedModelError
from sealedml.runtime.memory_bounded import StreamingModel

KEY = bytes(range(32))
SECRET = b"platform-root-key:" + bytes(range(46))  # 64 bytes a model must never read


def _external(name: str, location: str = "secret.bin") -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = TensorProto.UINT8
    tensor.dims.append(len(SECRET))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(SECRET)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto] = (), **graph: object) -> onnx.ModelProto:  # type: ignore[assignment]
    # A genuine weight too, so the container has a manifest entry like any model.
    weight = numpy_helper.from_array(np.ones((1,), np.float32), "w")
    nodes = [helper.make_node("Mul", ["x", "w"], ["x2"], name="mul"), *nodes]
    g = helper.make_graph(
        nodes,
        "exfiltrate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("stolen", TensorProto.UINT8, [len(SECRET)]),
        ],
        [weight, *initializers],
        **graph,  # type: ignore[arg-type]
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def via_constant() -> onnx.ModelProto:
    node = helper.make_node("Constant", [], ["stolen"], name="steal")
    node.attribute.append(helper.make_attribute("value", _external("c")))
    return _model([node])


def via_initializer() -> onnx.ModelProto:
    return _model([helper.make_node("Identity", ["stolen_init"], ["stolen"], name="steal")], [_external("stolen_init")])


def via_subgraph() -> onnx.ModelProto:
    inner_node = helper.make_node("Constant", [], ["inner"], name="steal")
    inner_node.attribute.append(helper.make_attribute("value", _external("c")))
    branch = helper.make_graph(
        [inner_node], "branch", [], [helper.make_tensor_value_info("inner", TensorProto.UINT8, [len(SECRET)])]
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["stolen"], then_branch=branch, else_branch=branch, name="if")
    return _model([node], [cond])


def via_sparse_constant() -> onnx.ModelProto:
    values = _external("values")
    indices = numpy_helper.from_array(np.arange(len(SECRET), dtype=np.int64), "indices")
    sparse = helper.make_sparse_tensor(values, indices, [len(SECRET)])
    node = helper.make_node("Constant", [], ["stolen"], name="steal", sparse_value=sparse)
    return _model([node])


ATTACKS: dict[str, Callable[[], onnx.ModelProto]] = {
    "constant": via_constant,
    "initializer": via_initializer,
    "subgraph": via_subgraph,
    "sparse": via_sparse_constant,
}


def seal_as_malicious_owner(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Seal ``model`` as is: the owner's own tooling skips every external-data check."""
    with monkeypatch.context() as patch:
        patch.setattr(model_container, "check_external_data", lambda *args: None)
        original = sealing._strip

        def keep_external(m: onnx.ModelProto) -> tuple[onnx.ModelProto, list[sealing.PayloadTensor]]:
            honest = onnx.ModelProto.FromString(m.SerializeToString())
            external = [i for i in honest.graph.initializer if i.data_location == TensorProto.EXTERNAL]
            for init in external:
                honest.graph.initializer.remove(init)
            stripped, tensors = original(honest)
            stripped.graph.initializer.extend(external)
            return stripped, tensors

        patch.setattr(sealing, "_strip", keep_external)
        return seal_model(model, model_id="evil", model_version=1, model_key=KEY)


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding a file the model would like to read."""
    (tmp_path / "secret.bin").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("attack", ["constant", "initializer"])
def test_the_attack_is_real_without_the_check(runtime_dir: Path, attack: str) -> None:
    """ONNX Runtime does read the file into the outputs when nothing refuses the graph."""
    session = ort.InferenceSession(ATTACKS[attack]().SerializeToString(), providers=["CPUExecutionProvider"])
    stolen = session.run(["stolen"], {"x": np.ones((1,), np.float32)})[0]
    assert bytes(np.asarray(stolen)) == SECRET


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_sealed_graph_with_external_data_is_refused_whole_model(
    runtime_dir: Path, attack: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = seal_as_malicious_owner(ATTACKS[attack](), monkeypatch)
    with pytest.raises(SealedModelError, match="external data"):
        open_model(sealed, KEY)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("optimize", [True, False])
def test_sealed_graph_with_external_data_is_refused_memory_bounded(
    runtime_dir: Path, attack: str, optimize: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = seal_as_malicious_owner(ATTACKS[attack](), monkeypatch)
    with pytest.raises(SealedModelError, match="external data"):
        StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=1 << 20, optimize=optimize)


def test_manifest_tensor_pointing_outside_the_container_is_refused(runtime_dir: Path) -> None:
    """Even a tensor the manifest lists may only point to the container itself."""
    model = _model([helper.make_node("Identity", ["w"], ["stolen"], name="steal")])
    sealed_graph = seal_model(model, model_id="evil", model_version=1, model_key=KEY)
    graph = SealedModelReader(sealed_graph, KEY).graph()
    (init,) = [i for i in graph.graph.initializer if i.name == "w"]
    init.external_data[0].value = "secret.bin"  # what a malicious owner's manifest could name
    with pytest.raises(SealedModelError, match="outside the sealed model"):
        model_container.check_external_data(graph, {"w"})


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_seal_refuses_external_data_anywhere_with_a_hint(attack: str) -> None:
    with pytest.raises(SealedModelError, match="load the model with its data first"):
        seal_model(ATTACKS[attack](), model_id="evil", model_version=1, model_key=KEY)
