"""Showing an assessment: a text table per cut, and a figure (matplotlib, Agg backend).

:func:`format_table` renders the report dict of :func:`~sealedml.partition.assess.run.assess`;
:func:`plot` draws SSIM and re-identification per cut for each attack against both baselines,
the label probe against the model's accuracy and the majority rate, and a grid of example
reconstructions at a few cuts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sealedml.partition.assess.attacks import ATTACKS
from sealedml.partition.assess.run import Assessment

__all__ = ["format_table", "plot"]

_LABELS = {"rmle": "rMLE (white-box)", "inverse": "inverse net (black-box)", "query_free": "query-free (shadow)"}
_SHORT = {"rmle": "rMLE", "inverse": "inverse", "query_free": "query-free"}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """The report as a text table (one row per cut) followed by the baselines and the choices.

    Args:
        result: :attr:`Assessment.result`.

    Returns:
        Lines joined by newlines; columns per attack are ``SSIM/PSNR/re-id``.
    """
    head = ["cut", "IR", "Gu <δ", "Gu med", *(f"{_SHORT[a]} SSIM/PSNR/id" for a in ATTACKS), "probe", "readout", "ok"]
    rows = [head]
    for row in result["cuts"]:
        gu = row["gu"] or {}
        cells = [row["cut"], "x".join(str(d) for d in row["ir_shape"][0]) + ("+…" if len(row["ir_shape"]) > 1 else "")]
        cells += [_cell(gu.get("below_delta")), _cell(gu.get("median_ratio"))]
        for attack in ATTACKS:
            s = row["attacks"][attack]
            cells.append(f"{_cell(s['ssim'])}/{s['psnr']:.1f}/{_cell(s['reid'])}")
        cells += [_cell(row["label_probe"]), _cell(row["readout"]), "yes" if row["passes"] else "no"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    base = result["baselines"]
    margin = result["settings"]["margin"]
    baseline = result["settings"]["baseline"].replace("_", " ")
    decision = result["front_decision"]
    lines += [
        "",
        f"baselines (SSIM/PSNR/id): dataset mean {_cell(base['dataset_mean']['ssim'])}/"
        f"{base['dataset_mean']['psnr']:.1f}/{_cell(base['dataset_mean']['reid'])}, class mean (knows the label) "
        f"{_cell(base['class_mean']['ssim'])}/{base['class_mean']['psnr']:.1f}/{_cell(base['class_mean']['reid'])}",
        f"label: model accuracy {_cell(result['model_accuracy'])}, majority class {_cell(result['majority_rate'])}; "
        f"{result['test_samples']} test inputs, {result['aux_samples']} auxiliary",
        f"margin: SSIM ≤ {baseline} + {margin['ssim']}, re-id ≤ {baseline} + {margin['reid']}",
        f"front cut: {result['chosen_front'] or 'none'} — {decision['reason']}",
        f"back cut: {result['chosen_back'] or 'none'} — {result['back_decision']['reason']}",
        f"Gu et al.'s rule: {result['gu_front'] or 'none'} — {result['gu_decision']}",
        f"total {result['total_seconds']:.1f} s",
    ]
    return "\n".join(lines)


def _image(array: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    low, high = value_range
    img = np.clip((array - low) / (high - low), 0.0, 1.0)
    return img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))


def plot(assessment: Assessment, path: Path, *, example_cuts: int = 4) -> Path:
    """Write the assessment's figure as a PNG.

    Args:
        assessment: from :func:`~sealedml.partition.assess.run.assess`.
        path: where to write it.
        example_cuts: at most this many cuts (spread front to back) in the reconstruction grid.

    Returns:
        ``path``.
    """
    from sealedml._internal.extras import require

    matplotlib = require("matplotlib", "assess", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = assessment.result
    rows = result["cuts"]
    names = [r["cut"] for r in rows]
    steps = np.arange(len(rows))
    value_range = (result["input"]["value_range"][0], result["input"]["value_range"][1])
    picked = sorted({round(i) for i in np.linspace(0, len(rows) - 1, min(example_cuts, len(rows)))}) if rows else []
    shown = len(assessment.originals) > 0 and bool(picked)
    grid_rows = len(ATTACKS) if shown else 0
    figure = plt.figure(figsize=(13, 4 + 1.4 * grid_rows), layout="constrained")
    spec = figure.add_gridspec(1 + grid_rows, max(3, len(picked) + 1), height_ratios=[3] + [1] * grid_rows)
    base = result["baselines"]
    for column, (metric, title) in enumerate((("ssim", "SSIM"), ("reid", "re-identification"))):
        axis = figure.add_subplot(spec[0, column if column < 2 else 2])
        for attack in ATTACKS:
            axis.plot(steps, [r["attacks"][attack][metric] for r in rows], marker="o", label=_LABELS[attack])
        axis.axhline(base["dataset_mean"][metric], color="grey", linestyle="--", label="dataset mean")
        axis.axhline(base["class_mean"][metric], color="black", linestyle=":", label="class mean (knows label)")
        axis.set_title(title)
        axis.set_xticks(steps, names, rotation=45, ha="right", fontsize=8)
        axis.set_ylim(0, 1.05)
        if column == 0:
            axis.legend(fontsize=7)
    axis = figure.add_subplot(spec[0, 2:])
    axis.plot(steps, [r["label_probe"] for r in rows], marker="o", label="label probe (logistic regression)")
    gu = [np.nan if r["gu"] is None else r["gu"]["below_delta"] for r in rows]
    axis.plot(steps, gu, marker="s", label="Gu: share with d_min < δ")
    axis.axhline(result["model_accuracy"], color="grey", linestyle="--", label="model accuracy")
    axis.axhline(result["majority_rate"], color="black", linestyle=":", label="majority class")
    axis.set_title("label and Gu et al.")
    axis.set_xticks(steps, names, rotation=45, ha="right", fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=7)
    if shown:
        # One row per attack, one column per example cut; the true input sits left of the first row.
        for r, attack in enumerate(ATTACKS):
            for c, index in enumerate([None, *picked]):
                axis = figure.add_subplot(spec[1 + r, c])
                axis.set_xticks([])
                axis.set_yticks([])
                if index is None:
                    if r == 0:
                        axis.set_title("input", fontsize=8)
                        axis.imshow(_image(assessment.originals[0], value_range), cmap="gray", vmin=0, vmax=1)
                    else:
                        axis.axis("off")
                    continue
                if c == 1:
                    axis.set_ylabel(_SHORT[attack], fontsize=8)
                if r == 0:
                    axis.set_title(names[index], fontsize=8)
                image = assessment.reconstructions[names[index]][attack][0]
                axis.imshow(_image(image, value_range), cmap="gray", vmin=0, vmax=1)
    figure.suptitle(f"{result['model']}: leakage per cut (front cut: {result['chosen_front'] or 'none'})")
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
