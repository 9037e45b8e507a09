"""Encrypted inference through the gateway: ``infer``.

::

    sealedml infer ID --gateway URL --identity FILE --keyservice URL
        --input X.npy | --input NAME=FILE.npy ... | --input FILE.npz  [--out Y.npy|Y.npz] [--skip-check]
    sealedml infer --mode seco --gateway URL --client DIR/user --input X.npy|TEST.npz [--out Y.npy]
        [--reference MODEL.onnx]

Inputs and outputs are NumPy files (never pickles). Before sending, the KeyService is asked
whether you enabled the model (``--skip-check`` saves that round trip). ``--mode seco`` talks to
a SECO-mode gateway instead (``sealedml seco``, ``docs/seco.md``): no TEE, no KeyService; the
input (one sample, or a batch along the first axis) is masked, and the logits come back as
three shares that only you add up. With a ``.npz`` of ``x`` and ``y`` it reports the accuracy;
``--reference MODEL.onnx`` runs the plaintext model locally beside it and reports the
fixed-point error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sealedml.cli._args import Subcommands, add_command, add_keyservice, keyservice_client
from sealedml.cli._config import require_configured
from sealedml.errors import AccessDenied, ConfigurationError, Error, InputError

__all__ = ["add_parser", "handle_infer", "load_numpy"]


def _load_inputs(specs: list[str]) -> tuple[dict[str, np.ndarray] | list[np.ndarray], bool]:
    """The ``--input`` values as named or positional arrays; True when positional."""
    if not specs:
        raise InputError("give --input X.npy, --input NAME=FILE.npy (repeatable), or --input FILE.npz")
    if len(specs) == 1 and "=" not in specs[0]:
        path = Path(specs[0])
        data = load_numpy(path)
        if isinstance(data, np.ndarray):
            return [data], True
        names = list(data)
        if all(n.startswith("arr_") for n in names):
            return [data[f"arr_{i}"] for i in range(len(names))], True
        return {n: data[n] for n in names}, False
    named: dict[str, np.ndarray] = {}
    for spec in specs:
        if "=" not in spec:
            raise InputError(f"--input {spec!r}: with several inputs use NAME=FILE.npy")
        name, _, file = spec.partition("=")
        array = load_numpy(Path(file))
        if not isinstance(array, np.ndarray):
            raise InputError(f"--input {spec!r}: expected a .npy file")
        if name in named:
            raise InputError(f"input {name!r} given twice")
        named[name] = array
    return named, False


def load_numpy(path: Path) -> Any:
    """A ``.npy`` array, or an ``.npz`` file's arrays by name (never pickles).

    Raises:
        InputError: missing or not a NumPy file.
    """
    if not path.is_file():
        raise InputError(f"{path} not found")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path} is not a .npy/.npz file") from exc
    if isinstance(data, np.lib.npyio.NpzFile):
        return {k: data[k] for k in data.files}
    return data


def _save_outputs(outputs: dict[str, np.ndarray], out: Path) -> Path:
    if len(outputs) == 1 and out.suffix == ".npy":
        np.save(out, next(iter(outputs.values())))
        return out
    if out.suffix == ".npy":
        # Keep the result rather than fail after the work is done.
        target = out.with_suffix(".npz")
        np.savez(target, **outputs)  # type: ignore[arg-type]
        print(f"note: the model has {len(outputs)} outputs; wrote {target} (.npz) instead of {out}", file=sys.stderr)
        return target
    target = out if out.suffix == ".npz" else out.with_suffix(".npz")
    np.savez(target, **outputs)  # type: ignore[arg-type]
    return target


def _describe(array: np.ndarray) -> dict[str, Any]:
    info: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if array.size <= 64:
        info["values"] = array.tolist()
    return info


def _denied_reason(args: argparse.Namespace) -> str:
    """What a user may learn of a denial: the category of their own pair's state, asked of the KeyService."""
    from sealedml.client.keyservice import describe_denial

    try:
        with keyservice_client(args) as ks:
            return describe_denial(ks.model_info(args.model_id))
    except Error:
        return describe_denial(None)


def handle_infer(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``infer``: send encrypted inputs through the gateway, decrypt and describe (or save) the outputs.

    Raises:
        InputError: missing or unreadable input files.
        ConfigurationError: the model is not enabled for you (unless ``--skip-check``), or bad identity/trust.
        AccessDenied: no grant, no consent, or revoked.
    """
    from sealedml._internal.http import parse_server_timing
    from sealedml.client.gateway import InferenceClient
    from sealedml.client.identity import Identity

    if args.mode == "seco":
        from sealedml.cli.seco import run_seco_infer

        return run_seco_infer(args)
    from sealedml.cli._config import configured

    # TEE mode only: a SECO client is a directory, not an identity and a KeyService.
    args.identity = args.identity or (Path(value) if (value := configured("identity")) else None)
    args.keyservice = args.keyservice or configured("keyservice")
    missing = [
        flag
        for flag, value in (("ID", args.model_id), ("--identity", args.identity), ("--keyservice", args.keyservice))
        if value is None
    ]
    seco_only = [
        flag for flag, value in (("--client", args.client), ("--reference", args.reference)) if value is not None
    ]
    if seco_only:
        raise ConfigurationError(f"{', '.join(seco_only)}: --mode seco only")
    if missing:
        raise ConfigurationError(f"infer needs {', '.join(missing)} (or --mode seco)")
    inputs, _ = _load_inputs(args.input)
    identity = Identity.load(args.identity)
    if not args.skip_check:
        with keyservice_client(args) as ks:
            info = ks.model_info(args.model_id)
        if not info.consented:
            raise ConfigurationError(f"run `sealedml model enable {args.model_id}` first (no request key/consent)")
        if info.access not in (None, "ok"):
            raise AccessDenied(f"denied ({info.access}): {info.access_hint}")
    t0 = time.perf_counter()
    from sealedml._internal.limits import max_request

    with InferenceClient(args.gateway, identity, max_request=max_request(args.max_request)) as client:
        try:
            outputs = client.infer(args.model_id, inputs)
        except AccessDenied:
            raise AccessDenied(_denied_reason(args)) from None
        cold, timing, peak = client.last_cold_start, client.last_server_timing, client.last_peak_bytes
    result: dict[str, Any] = {
        "model_id": args.model_id,
        "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
        "cold_start": cold,
        # Where the time went, as the gateway and the instance report it (untrusted hints).
        "phases_ms": {name: round(seconds * 1000, 2) for name, seconds in parse_server_timing(timing).items()},
        "outputs": {name: _describe(value) for name, value in outputs.items()},
    }
    if peak is not None:
        result["peak_bytes"] = peak
    if args.out is not None:
        result["out"] = str(_save_outputs(outputs, args.out))
    return result


def add_parser(subparsers: Subcommands) -> None:
    """Register ``infer`` on ``subparsers``."""
    p = add_command(subparsers, "infer", handle_infer, "encrypted inference through the gateway")
    p.add_argument("model_id", metavar="ID", nargs="?", default=None, help="the model (TEE mode)")
    p.add_argument(
        "--mode",
        choices=["tee", "seco"],
        default="tee",
        help="tee: a sealed model in an attested runtime (default); seco: split across three servers, no TEE",
    )
    p.add_argument("--client", type=Path, default=None, metavar="DIR", help="--mode seco: your party directory")
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="MODEL.onnx",
        help="--mode seco: also run the plaintext model here and report the fixed-point error",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="X.npy|NAME=FILE.npy|FILE.npz",
        help="an input: X.npy (a single-input model), NAME=FILE.npy (once per input) or FILE.npz",
    )
    p.add_argument(
        "--out", type=Path, default=None, metavar="Y.npy|Y.npz", help="write the outputs: Y.npy (one output) or Y.npz"
    )
    p.add_argument("--gateway", default=None, metavar="URL", help="the gateway's URL (default: $SEALEDML_GATEWAY)")
    require_configured(p, "gateway")
    p.add_argument(
        "--max-request",
        default=None,
        metavar="SIZE",
        help="largest request sent, e.g. 128MB (default: $SEALEDML_MAX_REQUEST or 64MiB; the gateway's must allow it)",
    )
    p.add_argument("--skip-check", action="store_true", help="do not ask the KeyService whether you enabled the model")
    p.add_argument(
        "--identity",
        type=Path,
        default=None,
        metavar="FILE",
        help="identity file (TEE mode; default: $SEALEDML_IDENTITY)",
    )
    add_keyservice(p, required=False)
