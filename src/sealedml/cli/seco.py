"""SECO mode (cryptographic split inference across three servers, no TEE): ``seco deploy``, ``seco serve``.

::

    sealedml seco deploy MODEL.onnx --out DIR [--data X.npz|X.npy]
    sealedml seco serve --role remote --dir DIR/remote-b [--host H] [--port N] [--record FILE]
    sealedml seco serve --role remote --dir DIR/remote-c [--port N]
    sealedml seco serve --role gateway --dir DIR/gateway --remote B=URL --remote C=URL [--port N]
    sealedml infer --mode seco --gateway URL --client DIR/user --input X.npy|TEST.npz [--out Y.npy]
        [--reference MODEL.onnx]

``deploy`` writes one directory per party (``docs/seco.md``): the gateway's (no weights), each
remote server's weight share, and the user's. Each server runs from its own directory and
starts its own HE side process (``make he-venv`` provides the interpreter).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sealedml.cli._args import DEFAULT_HOST, Subcommands, add_command, add_group
from sealedml.errors import ConfigurationError, InputError

__all__ = ["add_parser", "handle_seco_deploy", "handle_seco_serve", "load_samples", "run_seco_infer"]


def load_samples(path: Path) -> Any:
    """Samples from a ``.npy`` file or an ``.npz`` file's ``x`` (or only) array, as float32.

    Raises:
        InputError: missing, unreadable, or an ``.npz`` without ``x`` and with several arrays.
    """
    import numpy as np

    from sealedml.cli.infer import load_numpy

    data = load_numpy(path)
    if isinstance(data, dict):
        if "x" not in data and len(data) != 1:
            raise InputError(f"{path}: expected an array named x (found {', '.join(data)})")
        data = data["x"] if "x" in data else next(iter(data.values()))
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{path}: expected numbers, got {data.dtype}")
    return data.astype(np.float32)


def handle_seco_deploy(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``seco deploy``: compile, check the range on ``--data``, split, write per-party directories.

    Raises:
        InputError: the model has an operation SECO mode cannot compute (the node is named),
            or its fixed-point values would wrap around the field on ``--data``.
        ConfigurationError: ``--out`` exists and is not empty.
    """
    import onnx

    from sealedml.seco.deploy import deploy
    from sealedml.seco.model import compile_model

    if not args.model.is_file():
        raise InputError(f"{args.model} not found")
    try:
        graph = onnx.load(str(args.model))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise InputError(f"{args.model} is not an ONNX model") from exc
    model = compile_model(graph)
    peak = None
    if args.data is not None:
        samples = load_samples(args.data)
        peak = model.check_range(samples[: args.samples])
    written = deploy(model, args.out)
    arch = model.architecture
    result: dict[str, Any] = {
        "model": str(args.model),
        "layers": [list(shape) for shape in arch.layer_shapes],
        "input_shape": list(arch.input_shape),
        "prime": arch.prime,
        "frac_bits": arch.frac_bits,
        "directories": {party: str(path) for party, path in written.items()},
    }
    if peak is not None:
        result["peak_fixed_point"] = int(peak)
    else:
        result["note"] = "no --data: the fixed-point range was not checked"
    return result


def _remotes(specs: list[str]) -> dict[str, str]:
    remotes: dict[str, str] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or name not in ("B", "C") or not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"--remote {spec!r}: expected B=URL or C=URL (http:// or https://)")
        if name in remotes:
            raise ConfigurationError(f"--remote {name} given twice")
        remotes[name] = url
    return remotes


def handle_seco_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``seco serve``: run the gateway or a remote server until stopped.

    Raises:
        ConfigurationError: not a party directory of that role, or missing ``--remote``.
    """
    from sealedml.seco.serve import serve_gateway, serve_remote

    if args.role == "gateway":
        serve_gateway(args.dir, _remotes(args.remote), args.host, args.port, record=args.record)
    else:
        if args.remote:
            raise ConfigurationError("--remote is for the gateway")
        serve_remote(args.dir, args.host, args.port, record=args.record)
    return {"stopped": f"seco {args.role}"}


def run_seco_infer(args: argparse.Namespace) -> dict[str, Any]:
    """``infer --mode seco``: query the SECO gateway for each sample of ``--input``.

    Raises:
        ConfigurationError: no ``--client`` directory, or flags of TEE mode.
        InputError: an unreadable input, or one whose size is not a whole number of samples.
    """
    import statistics

    import numpy as np

    from sealedml.seco.deploy import load_party
    from sealedml.seco.http import HttpGateway
    from sealedml.seco.user import SecoUser

    if args.client is None:
        raise ConfigurationError("--mode seco needs --client DIR (the user directory from seco deploy)")
    tee_only = [flag for flag, value in (("ID", args.model_id), ("--identity", args.identity)) if value is not None]
    if tee_only:
        raise ConfigurationError(f"{', '.join(tee_only)}: TEE mode only (a SECO gateway serves one model)")
    if len(args.input) != 1 or "=" in args.input[0]:
        raise InputError("--mode seco takes one --input X.npy|X.npz (one sample or a batch)")
    party = load_party(args.client, expect="U")
    arch = party.architecture
    x = load_samples(Path(args.input[0]))
    if x.size % arch.n_inputs:
        raise InputError(f"the input has {x.size} values, not a multiple of the model's {arch.n_inputs}")
    samples = x.reshape(-1, arch.n_inputs)
    gateway = HttpGateway(args.gateway)
    results = []
    try:
        user = SecoUser(arch, party.key, party.peers, gateway)
        for i, sample in enumerate(samples):
            results.append(user.query(sample))
            if not args.json and len(samples) > 1 and ((i + 1) % 10 == 0 or i + 1 == len(samples)):
                print(f"[seco] {i + 1}/{len(samples)} queries", file=sys.stderr, flush=True)
    finally:
        gateway.close()
    logits = np.stack([r.logits for r in results])
    outputs = arch.model_output(logits)  # what the ONNX model outputs (its final Softmax, if any)
    out: dict[str, Any] = {
        "mode": "seco",
        "samples": len(results),
        "predictions": logits.argmax(axis=1).tolist(),
        "offline_s": round(statistics.median(r.offline_s for r in results), 4),
        "online_ms": round(statistics.median(r.online_ms for r in results), 2),
        "user_cpu_ms": round(statistics.median(r.user_cpu_ms for r in results), 3),
        "link_bytes": results[-1].link_bytes,
    }
    if len(results) <= 8:
        out["logits"] = logits.round(4).tolist()
        if arch.softmax:
            out["probabilities"] = outputs.round(4).tolist()
    labels = _labels(Path(args.input[0]), len(results))
    if labels is not None:
        out["accuracy"] = round(float((logits.argmax(axis=1) == labels).mean()), 4)
    if args.reference is not None:
        out["reference"] = _compare(args.reference, samples.reshape(-1, *arch.input_shape), outputs, labels)
    if args.out is not None:
        np.save(args.out, outputs)
        out["out"] = str(args.out)
    return out


def _labels(path: Path, n: int) -> Any:
    """The ``y`` array of an ``.npz`` input with one label per sample, else None."""
    from sealedml.cli.infer import load_numpy

    data = load_numpy(path)
    if not isinstance(data, dict) or "y" not in data or data["y"].shape != (n,):
        return None
    return data["y"]


def _compare(model_path: Path, x: Any, outputs: Any, labels: Any) -> dict[str, Any]:
    """The plaintext model on the same inputs (ONNX Runtime, here): SECO mode's fixed-point error.

    Raises:
        InputError: the reference is not an ONNX model taking these inputs.
    """
    import numpy as np
    import onnxruntime as ort

    if not model_path.is_file():
        raise InputError(f"{model_path} not found")
    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        plain = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0].reshape(outputs.shape)
    except Exception as exc:  # ONNX Runtime's own exception types
        raise InputError(f"{model_path}: not an ONNX model for these inputs ({type(exc).__name__})") from None
    agree = int((plain.argmax(axis=1) == outputs.argmax(axis=1)).sum())
    report: dict[str, Any] = {
        "model": str(model_path),
        "max_abs_error": float(np.abs(outputs - plain).max()),
        "predictions_equal": f"{agree}/{len(plain)}",
    }
    if labels is not None:
        report["accuracy"] = round(float((plain.argmax(axis=1) == labels).mean()), 4)
    return report


def add_parser(subparsers: Subcommands) -> None:
    """Register the ``seco`` group on ``subparsers``."""
    seco = add_group(subparsers, "seco", "SECO mode: split inference across three servers, no TEE")
    p = add_command(seco, "deploy", handle_seco_deploy, "split a model into per-server weight shares and identities")
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="a new directory, one folder per party")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="X.npz|X.npy",
        help="calibration inputs: refuse the model if fixed point would wrap around the field",
    )
    p.add_argument("--samples", type=int, default=50, help="calibration samples to check (default 50)")
    p = add_command(seco, "serve", handle_seco_serve, "run the gateway (A) or a remote server (B or C)")
    p.add_argument(
        "--role",
        required=True,
        choices=["gateway", "remote"],
        help="which server: gateway (party A) or remote (B or C)",
    )
    p.add_argument("--dir", required=True, type=Path, metavar="DIR", help="this party's directory from seco deploy")
    p.add_argument(
        "--remote", action="append", default=[], metavar="B=URL|C=URL", help="gateway only: where B and C listen"
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="0: any free port (announced on stdout)")
    p.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="FILE",
        help="append every message this server opens to FILE (JSON lines): an audit of what it learns",
    )
