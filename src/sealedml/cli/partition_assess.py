"""``partition assess``: how much of the input each candidate cut's IR leaks, and which cuts to choose.

::

    sealedml partition assess MODEL.onnx --data DATA.npz --aux AUX.npz [--cuts auto|T1,T2+T3,...]
        [--margin M|ssim=A,reid=B] [--baseline dataset-mean|class-mean] [--seed N] [--samples N]
        [--iterations N] [--inverse-steps N] [--shadow-steps N] [--plot FILE.png]

Prints a table per cut (Gu et al.'s KL metric, each attack's SSIM/PSNR/re-identification, the
label probe) and the chosen front and back cuts with what decided them; ``--json`` prints the
whole report. torch and scikit-image are imported only when the command runs. See docs/partition.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sealedml.cli._args import Subcommands, add_command
from sealedml.errors import ConfigurationError

__all__ = ["add_assess", "check_plot_path", "emit_assessment", "handle_partition_assess"]


def _require_assess_extras() -> None:
    try:
        import skimage  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "partition assess needs torch and scikit-image: pip install 'sealedml[assess]'"
        ) from exc


def check_plot_path(path: Path | None) -> None:
    """Raises: ConfigurationError — ``--plot`` is not a ``.png`` file name."""
    if path is not None and path.suffix.lower() != ".png":
        raise ConfigurationError(f"--plot {path}: give a .png file name")


def emit_assessment(result: dict[str, Any], *, as_json: bool) -> dict[str, Any]:
    """What an assessment command returns: the whole report for ``--json``, else the table, printed."""
    if as_json:
        return result
    from sealedml.partition.assess import format_table

    print(format_table(result))
    return {"plot": result["plot"]} if "plot" in result else {}


def _positive(value: int, flag: str, minimum: int = 1) -> int:
    if value < minimum:
        raise ConfigurationError(f"{flag} must be ≥ {minimum}")
    return value


def handle_partition_assess(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``partition assess``: measure each cut's leakage and choose the front and back cuts.

    Raises:
        ConfigurationError: torch missing, no ``--aux``, an unreadable model or data file, data
            that does not fit the model, a cut that does not separate it, an operator the
            translator refuses, or a bad ``--margin``.
    """
    if args.aux is None:
        raise ConfigurationError(
            "give --aux AUX.npz: the attacker's own labelled data, disjoint from --data "
            "(sealedml zoo export writes both for the trained zoo models)"
        )
    _require_assess_extras()
    from sealedml.cli.partition import load_onnx
    from sealedml.partition.assess import (
        AttackSettings,
        Settings,
        assess,
        load_dataset,
        parse_cuts,
        parse_margin,
        plot,
    )

    try:
        margin = parse_margin(args.margin)
    except ValueError as exc:
        raise ConfigurationError(f"--margin {args.margin!r}: {exc}") from exc
    attacks = AttackSettings(
        rmle_iterations=_positive(args.iterations, "--iterations", 0),
        inverse_steps=_positive(args.inverse_steps, "--inverse-steps", 0),
        shadow_steps=_positive(args.shadow_steps, "--shadow-steps", 0),
    )
    settings = Settings(
        seed=args.seed,
        margin=margin,
        baseline=args.baseline.replace("-", "_"),
        samples=_positive(args.samples, "--samples", 2),
        attacks=attacks,
    )
    check_plot_path(args.plot)
    model = load_onnx(args.model)
    test, aux = load_dataset(args.data), load_dataset(args.aux)
    cuts = parse_cuts(args.cuts)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    assessment = assess(model, test, aux, cuts=cuts, settings=settings, progress=None if args.json else progress)
    result = assessment.to_dict()
    if args.plot is not None:
        result["plot"] = str(plot(assessment, args.plot))
    return emit_assessment(result, as_json=args.json)


def add_assess(group: Subcommands) -> None:
    """Register ``assess`` on the ``partition`` group."""
    p = add_command(
        group,
        "assess",
        handle_partition_assess,
        "measure how much each candidate cut leaks of the input and choose the front and back cuts",
    )
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument("--data", required=True, type=Path, metavar="DATA.npz", help="test inputs x and labels y")
    p.add_argument(
        "--aux",
        type=Path,
        metavar="AUX.npz",
        help="the attacker's own labelled data (x, y), disjoint from --data; required: the command "
        "refuses to run without it rather than split --data",
    )
    p.add_argument(
        "--cuts",
        default="auto",
        metavar="auto|T1,T2+T3,...",
        help="cuts to assess: auto (single-tensor cuts after activation, pooling or flatten nodes, plus "
        "the last cut), or tensor names separated by commas, a multi-tensor cut joined by + (default auto)",
    )
    p.add_argument(
        "--margin",
        default="0.05",
        metavar="M|ssim=A,reid=B",
        help="a front cut passes when every attack's re-identification ≤ the baseline's + reid and its "
        "SSIM ≤ the baseline's + ssim (see --baseline); M sets both (default 0.05)",
    )
    p.add_argument(
        "--baseline",
        default="dataset-mean",
        choices=["dataset-mean", "class-mean"],
        help="what the margin is added to: the dataset-mean image (default), or the class-mean image, "
        "which concedes the label and counts only what the IR reveals beyond it",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the test subset and every attack (default 0)")
    p.add_argument("--samples", type=int, default=200, metavar="N", help="test inputs assessed at most (default 200)")
    p.add_argument("--iterations", type=int, default=300, metavar="N", help="rMLE Adam steps (default 300)")
    p.add_argument(
        "--inverse-steps", type=int, default=800, metavar="N", help="inverse-network training steps (default 800)"
    )
    p.add_argument(
        "--shadow-steps", type=int, default=300, metavar="N", help="shadow front training steps (default 300)"
    )
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also write a figure")
