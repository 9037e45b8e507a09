"""Built-in models: ``zoo export``.

::

    sealedml zoo export digits|mobilenetv2|resnet50|vgg16|toy --out FILE.onnx [--seed N]
        [--test-data FILE.npy [--samples N]]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sealedml.cli._args import Subcommands, add_command, add_group
from sealedml.errors import ConfigurationError

__all__ = ["add_parser", "handle_zoo_export"]


def handle_zoo_export(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``zoo export``: write a built-in model as ONNX (and for digits, optionally test inputs).

    Raises:
        ConfigurationError: ``--test-data`` for a model other than digits.
    """
    import numpy as np
    import onnx

    from sealedml import zoo

    model = zoo.get(args.name, seed=args.seed)
    onnx.save(model, str(args.out))
    result: dict[str, Any] = {"model": args.name, "out": str(args.out), "bytes": args.out.stat().st_size}
    if args.test_data is not None:
        if args.name != "digits":
            raise ConfigurationError("--test-data exists for the digits model only")
        dm = zoo.digits()
        np.save(args.test_data, dm.x_test[: args.samples])
        result["test_data"] = str(args.test_data)
    return result


def add_parser(subparsers: Subcommands) -> None:
    """Register the ``zoo`` group on ``subparsers``."""
    zoo = add_group(subparsers, "zoo", "built-in models")
    p = add_command(zoo, "export", handle_zoo_export, "write a built-in model as ONNX")
    p.add_argument("name", choices=["digits", "mobilenetv2", "resnet50", "vgg16", "toy"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-data", type=Path, default=None, help="digits only: also write test inputs (.npy)")
    p.add_argument("--samples", type=int, default=10)
