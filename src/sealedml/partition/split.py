"""Split an ONNX model three ways at two cuts: front (TEE), middle (untrusted), back (TEE).

The front computes the front cut's tensors from the model's inputs; the middle
computes the back cut's tensors from the front cut's; the back computes the
model's outputs from the back cut's. A tensor may be in both cuts (a skip
connection that bypasses the middle): the middle then passes it through.

:func:`split_model` returns the three parts and a :class:`PartitionManifest`
naming every tensor that crosses a boundary, with its dtype and shape;
:meth:`Partition.write` stores them as ``front.onnx``, ``middle.onnx``,
``back.onnx`` and ``partition.json``; :func:`compose_max_abs_diff` checks that
front ∘ middle ∘ back equals the whole model on given inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, shape_inference
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sealedml.partition.blind.spec import BlindSpec, artifact_name, blind_middle
from sealedml.partition.flops import node_flops
from sealedml.partition.graph import GraphIndex, PartitionError, check_cut

__all__ = [
    "PART_NAMES",
    "PartInfo",
    "Partition",
    "PartitionManifest",
    "TensorSpec",
    "compose_max_abs_diff",
    "load_partition",
    "run_parts",
    "split_model",
]

#: The three parts, in execution order.
PART_NAMES: tuple[str, ...] = ("front", "middle", "back")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class TensorSpec(_Frozen):
    """A tensor crossing a boundary: name, numpy dtype name and shape (None: symbolic)."""

    name: str
    dtype: str
    shape: list[int | None]

    @property
    def nbytes_per_sample(self) -> int:
        """Bytes of one sample (a symbolic first dimension counted as 1)."""
        dims = [d if d is not None else 1 for d in self.shape]
        return int(np.prod(dims, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class PartInfo(_Frozen):
    """One part: where it runs, its digest (SHA-256 of the ONNX bytes), nodes and operations."""

    runs_in: Literal["tee", "untrusted"]
    sha256: str
    nodes: int
    flops: int


class PartitionManifest(_Frozen):
    """What crosses each boundary of a three-way split (``partition.json``)."""

    format: Literal[1] = 1
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    front_cut: list[TensorSpec] = Field(min_length=1)
    back_cut: list[TensorSpec] = Field(min_length=1)
    parts: dict[str, PartInfo]
    #: Set for a blinded partition (``partition split --blind``): the middle runs in the TEE
    #: and only its linear layers' blinded products are outsourced.
    blind: BlindSpec | None = None

    @property
    def tee_flops_share(self) -> float:
        """The share of the model's operations that runs in the TEE (front and back; blinded: all but
        the outsourced products)."""
        total = sum(p.flops for p in self.parts.values())
        tee = sum(p.flops for p in self.parts.values() if p.runs_in == "tee")
        if self.blind is not None:
            tee -= self.blind.outsourced_flops
        return tee / total if total else 0.0

    @property
    def boundary_bytes_per_sample(self) -> int:
        """Bytes that leave and re-enter the TEE per sample (front cut out and back cut in; blinded: every
        outsourced layer's masked input and product)."""
        if self.blind is not None:
            return self.blind.boundary_bytes_per_sample
        return sum(t.nbytes_per_sample for t in [*self.front_cut, *self.back_cut])

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class Partition:
    """The three parts of a split model and their manifest."""

    front: onnx.ModelProto
    middle: onnx.ModelProto
    back: onnx.ModelProto
    manifest: PartitionManifest
    #: A blinded partition's executor artifacts, by file name (``linear-<i>.onnx``).
    artifacts: dict[str, bytes] = field(default_factory=dict)

    def part(self, name: str) -> onnx.ModelProto:
        """The part called ``name`` (one of :data:`PART_NAMES`)."""
        if name not in PART_NAMES:
            raise PartitionError(f"no part {name!r}: one of {', '.join(PART_NAMES)}")
        model: onnx.ModelProto = getattr(self, name)
        return model

    def write(self, directory: Path) -> list[Path]:
        """Write ``front.onnx``, ``middle.onnx``, ``back.onnx`` and ``partition.json`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name in PART_NAMES:
            path = directory / f"{name}.onnx"
            path.write_bytes(self.part(name).SerializeToString())
            written.append(path)
        for name, data in sorted(self.artifacts.items()):
            path = directory / name
            path.write_bytes(data)
            written.append(path)
        manifest = directory / "partition.json"
        manifest.write_text(self.manifest.to_json())
        return [*written, manifest]


def _spec(info: onnx.ValueInfoProto) -> TensorSpec:
    tensor = info.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
    shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return TensorSpec(name=info.name, dtype=dtype, shape=shape)


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = model.graph
    return {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}


def _check_order(index: GraphIndex, front: Sequence[str], back: Sequence[str]) -> None:
    """Every path from an input to a back-cut tensor must pass through the front cut."""
    path = index.path_avoiding(front, targets=[t for t in back if t not in set(front)])
    if path is not None:
        shown = index.describe_path(path, max(index.producer.get(n, -1) for n in front))
        raise PartitionError(
            f"back cut {','.join(back)} is not after front cut {','.join(front)}: the path {shown} avoids the front cut"
        )


def split_model(
    model: onnx.ModelProto,
    front_cut: Sequence[str],
    back_cut: Sequence[str],
    *,
    blind: tuple[int, int] | None = None,
) -> Partition:
    """Split ``model`` into front, middle and back at two cuts.

    Args:
        model: the whole model (weights inline).
        front_cut: tensor names; the front computes them from the inputs.
        back_cut: tensor names, after the front cut; the back computes the outputs from them.
        blind: ``(weight_bits, input_bits)`` for a blinded partition: the middle stays in
            the TEE and its linear layers are outsourced blinded (docs/blinded-offload.md).

    Raises:
        PartitionError: a cut that does not separate the graph, a back cut that is
            not after the front cut, an empty middle, or a tensor without a known type.
    """
    index = GraphIndex(model)
    front = check_cut(model, front_cut, index=index)
    back = check_cut(model, back_cut, index=index)
    raw = sorted(set(front.tensors) & set(index.inputs))
    if raw:
        raise PartitionError(f"front cut contains the model input {raw[0]!r}: the untrusted middle would receive it")
    final = sorted(set(back.tensors) & set(index.outputs))
    if final:
        raise PartitionError(f"back cut contains the model output {final[0]!r}: the untrusted middle would compute it")
    if set(front.tensors) == set(back.tensors):
        raise PartitionError("the front and back cuts are the same: the middle would be empty")
    _check_order(index, front.tensors, back.tensors)
    inferred = shape_inference.infer_shapes(model)
    infos = _value_infos(inferred)
    missing = [t for t in (*front.tensors, *back.tensors) if t not in infos]
    if missing:
        raise PartitionError(f"no type or shape known for {', '.join(missing)} (run shape inference on the model)")
    extractor = onnx.utils.Extractor(inferred)
    inputs, outputs = index.inputs, index.outputs
    parts = {
        "front": extractor.extract_model(list(inputs), list(front.tensors)),
        "middle": extractor.extract_model(list(front.tensors), list(back.tensors)),
        "back": extractor.extract_model(list(back.tensors), list(outputs)),
    }
    for name, part in parts.items():
        part.graph.name = f"{model.graph.name or 'model'}_{name}"
        del part.graph.value_info[:]  # shapes are re-inferred on load; keep the parts small
    flops = node_flops(inferred)
    # Extracted parts hold copies of the nodes: match them to the whole graph by output name.
    producer = {out: i for i, node in enumerate(inferred.graph.node) for out in node.output if out}
    info: dict[str, PartInfo] = {}
    spec, artifacts = (
        (None, {}) if blind is None else blind_middle(parts["middle"], weight_bits=blind[0], input_bits=blind[1])
    )
    if spec is not None:
        outsourced = sum(flops[producer[layer.node]] for layer in spec.layers)
        spec = spec.model_copy(update={"outsourced_flops": outsourced})
    for name, part in parts.items():
        ops = sum(flops[producer[node.output[0]]] for node in part.graph.node if node.output)
        info[name] = PartInfo(
            runs_in="untrusted" if name == "middle" and blind is None else "tee",
            sha256=hashlib.sha256(part.SerializeToString()).hexdigest(),
            nodes=len(part.graph.node),
            flops=ops,
        )
    manifest = PartitionManifest(
        inputs=[_spec(infos[t]) for t in inputs],
        outputs=[_spec(infos[t]) for t in outputs],
        front_cut=[_spec(infos[t]) for t in front.tensors],
        back_cut=[_spec(infos[t]) for t in back.tensors],
        parts=info,
        blind=spec,
    )
    return Partition(parts["front"], parts["middle"], parts["back"], manifest, artifacts)


def load_partition(directory: Path) -> Partition:
    """Read a partition written by :meth:`Partition.write` and check each part's digest.

    Raises:
        PartitionError: a missing, unreadable or altered file.
    """
    try:
        manifest = PartitionManifest.model_validate_json((directory / "partition.json").read_text())
    except FileNotFoundError as exc:
        raise PartitionError(f"{directory}: no partition.json (write one with `sealedml partition split`)") from exc
    except (OSError, ValidationError, ValueError) as exc:
        raise PartitionError(f"{directory / 'partition.json'}: not a partition manifest") from exc
    if set(manifest.parts) != set(PART_NAMES):
        raise PartitionError(f"{directory / 'partition.json'}: parts must be {', '.join(PART_NAMES)}")
    models: dict[str, onnx.ModelProto] = {}
    for name in PART_NAMES:
        path = directory / f"{name}.onnx"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PartitionError(f"{path}: {exc.strerror or exc}") from exc
        if hashlib.sha256(data).hexdigest() != manifest.parts[name].sha256:
            raise PartitionError(f"{path} does not match partition.json (altered or from another split)")
        models[name] = onnx.ModelProto.FromString(data)
    artifacts: dict[str, bytes] = {}
    for layer in manifest.blind.layers if manifest.blind is not None else []:
        path = directory / artifact_name(layer.index)
        try:
            artifacts[path.name] = path.read_bytes()
        except OSError as exc:
            raise PartitionError(f"{path}: {exc.strerror or exc}") from exc
        if hashlib.sha256(artifacts[path.name]).hexdigest() != layer.sha256:
            raise PartitionError(f"{path} does not match partition.json (altered or from another split)")
    return Partition(models["front"], models["middle"], models["back"], manifest, artifacts)


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_parts(partition: Partition, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run front, middle and back in turn on CPU (ONNX Runtime); return the model's outputs."""
    values: dict[str, np.ndarray] = dict(inputs)
    for name in PART_NAMES:
        part = partition.part(name)
        feed = {i.name: values[i.name] for i in part.graph.input}
        names = [o.name for o in part.graph.output]
        values.update(zip(names, _session(part).run(names, feed), strict=True))
    return {t.name: values[t.name] for t in partition.manifest.outputs}


def compose_max_abs_diff(model: onnx.ModelProto, partition: Partition, inputs: Mapping[str, np.ndarray]) -> float:
    """The largest absolute difference between the whole model and front ∘ middle ∘ back."""
    whole = _session(model)
    names = [o.name for o in model.graph.output]
    expected = dict(zip(names, whole.run(names, dict(inputs)), strict=True))
    got = run_parts(partition, inputs)
    worst = 0.0
    for name in names:
        a, b = np.asarray(expected[name]), np.asarray(got[name])
        if a.shape != b.shape:
            return float("inf")
        if a.size:
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return worst
