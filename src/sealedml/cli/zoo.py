"""Built-in models: ``zoo export``.

::

    sealedml zoo export digits|digits-mlp|digits-small-cnn|mobilenetv2|resnet50|vgg16|toy --out FILE.onnx [--seed N]
        [--test-data FILE.npy [--samples N]]
    sealedml zoo export digits-cnn|faces-cnn --out FILE.onnx [--seed N] [--data TEST.npz] [--aux AUX.npz]
    sealedml zoo export digits-mlp|digits-small-cnn --out FILE.onnx [--data TEST.npz]

The trained CNNs (torch, ``pip install 'sealedml[assess]'``) come with their test split and the
attacker's auxiliary split as ``.npz`` files of ``x`` and ``y``: the inputs of ``partition assess``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sealedml.cli._args import Subcommands, add_command, add_group
from sealedml.errors import ConfigurationError

# sealedml.zoo.trained.NAMES, spelled out: importing the zoo here would slow every `sealedml --help`.
TRAINED = ("digits-cnn", "faces-cnn")
#: SECO mode's models (scikit-learn, no torch); ``--data`` writes their test split.
SECO_MODELS = ("digits-mlp", "digits-small-cnn")

__all__ = ["SECO_MODELS", "TRAINED", "add_parser", "handle_zoo_export"]


def _export_trained(args: argparse.Namespace) -> dict[str, Any]:
    """A trained CNN and, with ``--data`` / ``--aux``, its test and auxiliary splits as ``.npz``."""
    import numpy as np
    import onnx

    if args.test_data is not None:
        raise ConfigurationError("--test-data exists for the digits model only; use --data and --aux")
    from sealedml.zoo import trained

    victim = trained.load(args.name, seed=args.seed)
    onnx.save(victim.model, str(args.out))
    result: dict[str, Any] = {
        "model": args.name,
        "out": str(args.out),
        "bytes": args.out.stat().st_size,
        "test_accuracy": round(victim.test_accuracy, 4),
    }
    for flag, path, x, y in (
        ("data", args.data, victim.x_test, victim.y_test),
        ("aux", args.aux, victim.x_aux, victim.y_aux),
    ):
        if path is not None:
            with open(path, "wb") as handle:  # a file object: np.savez would append .npz to other names
                np.savez(handle, x=x, y=y)
            result[flag] = {"path": str(path), "samples": len(y)}
    return result


def _export_seco(args: argparse.Namespace) -> dict[str, Any]:
    """A SECO-mode model (trained with scikit-learn) and its test split as ``.npz`` (x, y)."""
    import numpy as np
    import onnx

    from sealedml.zoo.digits_mlp import digits_mlp, digits_small_cnn

    trained = digits_mlp() if args.name == "digits-mlp" else digits_small_cnn()
    onnx.save(trained.model, str(args.out))
    with open(args.data, "wb") as handle:  # a file object: np.savez would append .npz to other names
        np.savez(handle, x=trained.x_test.astype(np.float32), y=trained.y_test)
    return {
        "model": args.name,
        "out": str(args.out),
        "bytes": args.out.stat().st_size,
        "data": {"path": str(args.data), "samples": len(trained.y_test)},
    }


def handle_zoo_export(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``zoo export``: write a built-in model as ONNX (and for digits, optionally test inputs).

    Raises:
        ConfigurationError: ``--test-data`` for a model other than digits, ``--data``/``--aux`` for
            an untrained one, or torch missing for a trained one.
    """
    import numpy as np
    import onnx

    from sealedml import zoo

    if args.name in TRAINED:
        return _export_trained(args)
    if args.name in SECO_MODELS and args.data is not None and args.aux is None:
        return _export_seco(args)
    if args.data is not None or args.aux is not None:
        raise ConfigurationError(
            f"--data exists for {', '.join((*TRAINED, *SECO_MODELS))}; --aux for {', '.join(TRAINED)} only"
        )
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
    p.add_argument(
        "name",
        choices=[
            "digits",
            "digits-mlp",
            "digits-small-cnn",
            "mobilenetv2",
            "resnet50",
            "vgg16",
            "minilm",
            "toy",
            *TRAINED,
        ],
    )
    p.add_argument("--out", required=True, type=Path, help="where to write the ONNX model")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the random-weight models (default 0)")
    p.add_argument("--test-data", type=Path, default=None, help="digits only: also write test inputs (.npy)")
    p.add_argument("--samples", type=int, default=10, help="test samples written with --test-data (default 10)")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="TEST.npz",
        help="trained CNNs and SECO models (digits-mlp, digits-small-cnn): write the test split (x, y)",
    )
    p.add_argument(
        "--aux",
        type=Path,
        default=None,
        metavar="AUX.npz",
        help="trained CNNs only: write the attacker's auxiliary split (x, y), disjoint from the test split",
    )
