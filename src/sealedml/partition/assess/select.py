"""Choosing the cuts from per-cut numbers: pure functions over frozen snapshots, no model, no torch.

**Front cut.** The earliest assessed cut at which *every* attack stays within the margin of the
baseline (the dataset-mean image by default; the class-mean image when the label is conceded),
on both criteria: re-identification ≤ baseline + ``margin.reid`` and
SSIM ≤ baseline + ``margin.ssim``. Only the front cut's IR leaves the TEE as such (everything the
middle computes is a function of it), so a later cut that leaks again does not disqualify it. The
deciding attack is the one that exceeded the margin at the cut just before (by the largest excess):
it is what pushed the cut that far back. When no cut passes, nothing is chosen and the reason
names the attack that still leaks at the deepest cut.

**Back cut.** The host must see neither logits nor label, so the back part starts before the
layers whose outputs give the label by direct readout: the first cut whose argmax agrees with the
model's prediction on at least :data:`READOUT_AGREEMENT` of the test inputs (the logits or
probabilities). The back cut is the last assessed cut before it, and after the front cut. With no
such cut the readout is the model's output itself, and the back cut is the last assessed cut.
Deeper cuts still let a *trained* probe find the label; that is reported per cut, not hidden.

**Gu et al.'s rule**, for comparison: the earliest cut whose most similar channels all stay at
d ≥ δ (no test input below δ).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "READOUT_AGREEMENT",
    "BackChoice",
    "CutNumbers",
    "FrontChoice",
    "GuChoice",
    "Margin",
    "Score",
    "choose_back",
    "choose_front",
    "choose_gu",
    "parse_margin",
]

#: Agreement of an IR's argmax with the model's label from which the IR "gives the label by readout".
READOUT_AGREEMENT = 0.99


@dataclass(frozen=True)
class Margin:
    """How far above the baseline an attack may score and the cut still pass.

    Attributes:
        ssim: allowed SSIM above the baseline image's SSIM.
        reid: allowed re-identification rate above the baseline's (1/n for the dataset mean).
    """

    ssim: float = 0.05
    reid: float = 0.05

    def __post_init__(self) -> None:
        for name in ("ssim", "reid"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"margin {name} must be in [0, 1], not {value}")


def parse_margin(text: str) -> Margin:
    """``M`` (both criteria) or ``ssim=A,reid=B`` (either may be left out: default 0.05).

    Raises:
        ValueError: not a number or a key outside ``ssim``/``reid``, or a value outside [0, 1].
    """
    text = text.strip()
    if "=" not in text:
        value = float(text)
        return Margin(ssim=value, reid=value)
    values: dict[str, float] = {}
    for item in text.split(","):
        key, _, number = item.partition("=")
        if key.strip() not in ("ssim", "reid"):
            raise ValueError(f"unknown margin {key.strip()!r}: use ssim= and reid=")
        values[key.strip()] = float(number)
    return Margin(**values)


@dataclass(frozen=True)
class Score:
    """One attack's (or baseline's) mean SSIM and re-identification rate at one cut."""

    ssim: float
    reid: float


@dataclass(frozen=True)
class CutNumbers:
    """What selection needs of one cut.

    Attributes:
        name: the cut as written (``relu3`` or ``a+b``).
        attacks: score per attack name.
        readout: argmax agreement with the model's label (None: the IR is not ``[n, classes]``).
        gu_below_delta: Gu et al.'s fraction of inputs with d_min < δ (None: undefined here).
    """

    name: str
    attacks: Mapping[str, Score]
    readout: float | None = None
    gu_below_delta: float | None = None


@dataclass(frozen=True)
class FrontChoice:
    """The chosen front cut (None: none passes) and why.

    Attributes:
        cut: the chosen cut's name, or None.
        index: its position in the assessed list, or None.
        deciding_attack: the attack that pushed the cut back (None: the first cut passes already).
        deciding_cut: the cut where it last exceeded the margin.
        metric: ``ssim`` or ``reid``.
        value: its score there.
        limit: baseline + margin.
        failing: every attack over the margin at ``deciding_cut``.
        reason: one sentence.
    """

    cut: str | None
    index: int | None
    deciding_attack: str | None
    deciding_cut: str | None
    metric: str | None
    value: float | None
    limit: float | None
    failing: tuple[str, ...] = field(default=())
    reason: str = ""


@dataclass(frozen=True)
class BackChoice:
    """The chosen back cut (None: no cut fits) and the criterion that decided it."""

    cut: str | None
    index: int | None
    criterion: str
    readout_cut: str | None
    reason: str


@dataclass(frozen=True)
class GuChoice:
    """The cut Gu et al.'s rule would choose (None: none) and why."""

    cut: str | None
    reason: str


def _excesses(numbers: CutNumbers, baseline: Score, margin: Margin) -> list[tuple[float, str, str, float, float]]:
    """(excess, attack, metric, value, limit) for every criterion an attack breaks at this cut."""
    found = []
    for attack, score in numbers.attacks.items():
        for metric, value, limit in (
            ("reid", score.reid, baseline.reid + margin.reid),
            ("ssim", score.ssim, baseline.ssim + margin.ssim),
        ):
            if value > limit:
                found.append((value - limit, attack, metric, value, limit))
    return sorted(found, key=lambda e: -e[0])


def choose_front(cuts: Sequence[CutNumbers], baseline: Score, margin: Margin) -> FrontChoice:
    """The earliest cut where every attack stays within ``margin`` of ``baseline``.

    Args:
        cuts: front to back.
        baseline: the baseline image's scores (dataset mean or class mean).
        margin: allowed excess over the baseline.

    Returns:
        The choice, with the deciding attack (the one over the margin at the cut just before).
    """
    over = [_excesses(c, baseline, margin) for c in cuts]
    passing = [i for i, found in enumerate(over) if not found]
    if not passing:
        if not cuts:
            return FrontChoice(None, None, None, None, None, None, None, reason="no cut was assessed")
        _, attack, metric, value, limit = over[-1][0]
        return FrontChoice(
            None,
            None,
            attack,
            cuts[-1].name,
            metric,
            value,
            limit,
            tuple(dict.fromkeys(e[1] for e in over[-1])),
            f"no assessed cut keeps every attack within the margin: at the deepest cut {cuts[-1].name}, "
            f"{attack} still scores {metric} {value:.3f} > {limit:.3f}",
        )
    index = passing[0]
    name = cuts[index].name
    if index == 0:
        return FrontChoice(
            name, 0, None, None, None, None, None, reason=f"every attack stays within the margin already at {name}"
        )
    _, attack, metric, value, limit = over[index - 1][0]
    before = cuts[index - 1].name
    return FrontChoice(
        name,
        index,
        attack,
        before,
        metric,
        value,
        limit,
        tuple(dict.fromkeys(e[1] for e in over[index - 1])),
        f"{name} is the first cut where every attack stays within the margin; at {before}, "
        f"{attack} scored {metric} {value:.3f} > {limit:.3f}",
    )


def choose_back(cuts: Sequence[CutNumbers], front: int | None) -> BackChoice:
    """The last cut before the first one that gives the label by direct readout (and after ``front``).

    Args:
        cuts: front to back.
        front: index of the chosen front cut (None: none chosen; the back cut is still reported).

    Returns:
        The choice; ``cut`` is None when no assessed cut lies between the front cut and the readout.
    """
    criterion = "direct readout"
    readout = next((i for i, c in enumerate(cuts) if c.readout is not None and c.readout >= READOUT_AGREEMENT), None)
    if readout is None:
        index = len(cuts) - 1
        where = "no assessed cut gives the label by argmax: the readout is the model's output"
        readout_name = None
    else:
        index = readout - 1
        readout_name = cuts[readout].name
        where = (
            f"{readout_name} gives the label by argmax (agreement {cuts[readout].readout:.3f} ≥ {READOUT_AGREEMENT})"
        )
    low = -1 if front is None else front
    if index <= low:
        return BackChoice(
            None, None, criterion, readout_name, f"{where}, and no assessed cut lies between the front cut and it"
        )
    return BackChoice(
        cuts[index].name, index, criterion, readout_name, f"{where}; {cuts[index].name} is the last cut before it"
    )


def choose_gu(cuts: Sequence[CutNumbers]) -> GuChoice:
    """The earliest cut where Gu et al.'s rule finds no input whose most similar channel is below δ."""
    defined = [c for c in cuts if c.gu_below_delta is not None]
    for numbers in defined:
        if numbers.gu_below_delta == 0.0:
            return GuChoice(numbers.name, f"{numbers.name} is the first cut where every input has d_min ≥ δ")
    if not defined:
        return GuChoice(None, "undefined: no assessed cut has spatial channels")
    low = min(c.gu_below_delta or 0.0 for c in defined)
    return GuChoice(None, f"at every cut with spatial channels some inputs have d_min < δ (at least {low:.0%} of them)")
