"""Ternary partitioning: ``partition cuts`` and ``partition split``.

::

    sealedml partition cuts MODEL.onnx [--max-tensors N]
    sealedml partition split MODEL.onnx --front-cut T[,T...] --back-cut T[,T...] --out DIR [--check N]
                             [--blind [--weight-bits B] [--input-bits B]]

``cuts`` lists where the model can be cut (front to back); ``split`` writes the
front, middle and back models and ``partition.json`` into DIR and checks that
they compose to the whole model. With ``--blind`` the middle stays in the TEE and
only its linear layers are outsourced, masked and verified; the check then
compares against the quantized model. See docs/partition.md and
docs/blinded-offload.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sealedml.cli._args import Subcommands, add_command, add_group
from sealedml.errors import ConfigurationError

__all__ = ["add_parser", "handle_partition_cuts", "handle_partition_split", "load_onnx", "random_inputs"]


def load_onnx(path: Path) -> Any:
    """The ONNX model at ``path`` (weights inline).

    Raises:
        ConfigurationError: the file is missing or not an ONNX model.
    """
    import onnx

    try:
        return onnx.load(str(path))
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{path}: no such file") from exc
    except Exception as exc:  # protobuf DecodeError and friends
        raise ConfigurationError(f"{path}: not an ONNX model") from exc


def random_inputs(model: Any, samples: int, seed: int = 0) -> dict[str, Any]:
    """Seeded inputs for ``model``: standard normal floats, small non-negative integers; batch ``samples``."""
    import numpy as np
    from onnx import helper

    rng = np.random.default_rng(seed)
    constants = {init.name for init in model.graph.initializer}
    feeds: dict[str, Any] = {}
    for info in model.graph.input:
        if info.name in constants:
            continue
        tensor = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else samples for d in tensor.shape.dim]
        if dims and not tensor.shape.dim[0].HasField("dim_value"):
            dims[0] = samples
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        if dtype.kind == "f":
            feeds[info.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[info.name] = rng.integers(0, 3, size=dims).astype(dtype)
    return feeds


def _tensors(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def handle_partition_cuts(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``partition cuts``: where the model can be cut, front to back.

    Raises:
        ConfigurationError: unreadable model or a bad ``--max-tensors``.
    """
    from sealedml.partition.graph import candidate_cuts

    if args.max_tensors < 1:
        raise ConfigurationError("--max-tensors must be ≥ 1")
    model = load_onnx(args.model)
    cuts = candidate_cuts(model, max_tensors=args.max_tensors)
    return {
        "model": str(args.model),
        "nodes": len(model.graph.node),
        "cuts": [
            {"cut": c.name, "tensors": list(c.tensors), "after_node": c.position, "after_op": c.after_op} for c in cuts
        ],
    }


def handle_partition_split(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``partition split``: write front, middle and back and check that they compose.

    Raises:
        ConfigurationError: unreadable model, a cut that does not separate the model (the
            message names a crossing path), or parts that do not compose to the whole model.
    """
    from sealedml.partition.split import compose_max_abs_diff, split_model

    if args.check < 0:
        raise ConfigurationError("--check must be ≥ 0")
    model = load_onnx(args.model)
    blind = (args.weight_bits, args.input_bits) if args.blind else None
    partition = split_model(model, _tensors(args.front_cut), _tensors(args.back_cut), blind=blind)
    written = partition.write(args.out)
    manifest = partition.manifest
    result: dict[str, Any] = {
        "out": str(args.out),
        "files": [p.name for p in written],
        "front_cut": [t.name for t in manifest.front_cut],
        "back_cut": [t.name for t in manifest.back_cut],
        "tee_flops_share": round(manifest.tee_flops_share, 4),
        "boundary_bytes_per_sample": manifest.boundary_bytes_per_sample,
        "nodes": {name: part.nodes for name, part in manifest.parts.items()},
    }
    if manifest.blind is not None:
        result["blind"] = {
            "layers": [f"{layer.op} {layer.node}" for layer in manifest.blind.layers],
            "weight_bits": manifest.blind.weight_bits,
            "input_bits": manifest.blind.input_bits,
            "prime": manifest.blind.prime,
        }
    if args.check:
        inputs = random_inputs(model, args.check)
        diff = compose_max_abs_diff(model, partition, inputs)
        result["max_abs_diff"] = diff
        if manifest.blind is not None:
            from sealedml.partition.blind.check import blinded_matches_quantized

            # Quantization changes the outputs: the check is exactness against the quantized model.
            result["blinded_equals_quantized"] = blinded_matches_quantized(partition, inputs)
            if not result["blinded_equals_quantized"]:
                raise ConfigurationError("blinded offload differs from the quantized model (a bug: please report it)")
        elif not diff <= 1e-5:
            raise ConfigurationError(f"front ∘ middle ∘ back differs from the model by {diff:g} (> 1e-5)")
    return result


def add_parser(subparsers: Subcommands) -> None:
    """Register the ``partition`` group on ``subparsers``."""
    group = add_group(subparsers, "partition", "ternary model partitioning (front and back in the TEE)")
    p = add_command(group, "cuts", handle_partition_cuts, "list where a model can be cut, front to back")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument("--max-tensors", type=int, default=4, help="largest cut listed, in tensors (default 4)")

    p = add_command(group, "split", handle_partition_split, "split a model into front, middle and back")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument("--front-cut", required=True, metavar="T[,T...]", help="tensors the front computes")
    p.add_argument("--back-cut", required=True, metavar="T[,T...]", help="tensors the back starts from")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory for front.onnx, middle.onnx, back.onnx and partition.json",
    )
    p.add_argument(
        "--check",
        type=int,
        default=2,
        metavar="N",
        help="check the composition on N random samples (default 2; 0 skips)",
    )
    p.add_argument(
        "--blind",
        action="store_true",
        help="keep the middle in the TEE and outsource only its linear layers, masked and verified "
        "(docs/blinded-offload.md)",
    )
    p.add_argument("--weight-bits", type=int, default=8, metavar="B", help="with --blind: weight bits (default 8)")
    p.add_argument("--input-bits", type=int, default=8, metavar="B", help="with --blind: layer input bits (default 8)")
    from sealedml.cli import partition_assess

    partition_assess.add_assess(group)
