"""The assessment pipeline: per cut the IRs, Gu et al.'s metric, three attacks and a label probe; then the choice.

1. Check the model's signature and both data sets (:mod:`~sealedml.partition.assess.data`).
2. Resolve the cuts (:mod:`~sealedml.partition.assess.cuts`) and translate every front and rest
   to torch up front, so an unsupported operator is refused before anything long runs.
3. Run the whole model on the test inputs: its accuracy, predictions and class distributions;
   score the two baselines (dataset-mean and class-mean images of the auxiliary data).
4. Per cut: the IRs of the test and auxiliary inputs (ONNX Runtime: what the host would see),
   Gu's metric, rMLE, the inverse network, the query-free attack, the probe and the readout.
5. Choose the front and back cuts (:mod:`~sealedml.partition.assess.select`).

Every random draw is seeded from ``(seed, cut name, attack)``, so a cut's numbers do not depend
on which other cuts are assessed.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

from sealedml.errors import ConfigurationError
from sealedml.partition.assess.attacks import ATTACKS, AttackSettings, inverse_network, rmle, train_shadow
from sealedml.partition.assess.cuts import Slicer, resolve_cuts, run_onnx
from sealedml.partition.assess.data import Dataset, ModelSpec
from sealedml.partition.assess.gu import class_probabilities, gu_metric
from sealedml.partition.assess.metrics import image_scores, label_probe, mean_images, readout_agreement
from sealedml.partition.assess.select import CutNumbers, Margin, Score, choose_back, choose_front, choose_gu
from sealedml.partition.assess.torch_graph import to_torch
from sealedml.partition.graph import Cut

__all__ = ["BASELINES", "Assessment", "Settings", "assess"]

#: The baselines every attack is shown beside; selection adds the margin to one of them.
BASELINES: tuple[str, ...] = ("dataset_mean", "class_mean")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    """Everything that shapes an assessment besides the model, the data and the cuts.

    Attributes:
        seed: seed of the test subset and of every attack.
        margin: what "within the baseline" allows (:class:`~sealedml.partition.assess.select.Margin`).
        baseline: the baseline the margin is added to: ``dataset_mean`` (no IR, no label: the
            default) or ``class_mean`` (the label is conceded: only what the IR adds beyond it counts).
        samples: test inputs assessed at most (a seeded subset when the data has more); they are
            also the candidate set of re-identification.
        examples: test inputs whose reconstructions are kept for the figure.
        attacks: the attacks' iterations, steps and weights.
    """

    seed: int = 0
    margin: Margin = field(default_factory=Margin)
    baseline: str = "dataset_mean"
    samples: int = 200
    examples: int = 3
    attacks: AttackSettings = field(default_factory=AttackSettings)

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {self.baseline!r}")
        if self.samples < 2:
            raise ValueError("samples must be at least 2 (re-identification needs candidates)")
        if self.examples < 0:
            raise ValueError("examples must be ≥ 0")


@dataclass(frozen=True, eq=False)
class Assessment:
    """The result of :func:`assess`.

    Attributes:
        result: the JSON-able report (what ``sealedml partition assess --json`` prints).
        originals: the example test inputs ``[k, C, H, W]``.
        reconstructions: per cut name, per attack, the examples' reconstructions ``[k, C, H, W]``.
    """

    result: dict[str, Any]
    originals: np.ndarray
    reconstructions: dict[str, dict[str, np.ndarray]]

    def to_dict(self) -> dict[str, Any]:
        """The report (a shallow copy)."""
        return dict(self.result)


def _seed(seed: int, cut: str, attack: str) -> int:
    state = np.random.SeedSequence([seed, zlib.crc32(cut.encode()), zlib.crc32(attack.encode())])
    return int(state.generate_state(1)[0])


def _flat(irs: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(len(a), -1) for a in irs], axis=1)


def _quiet(_: str) -> None:
    return None


@dataclass(frozen=True, eq=False)
class _Context:
    """What every cut's assessment shares."""

    model: onnx.ModelProto
    spec: ModelSpec
    test: Dataset
    aux: Dataset
    value_range: tuple[float, float]
    probabilities: bool
    predictions: np.ndarray
    baseline: Score
    settings: Settings


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, func: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = func()
        self.seconds[name] = round(time.perf_counter() - start, 3)
        return value


def _one_cut(
    ctx: _Context, cut: Cut, front: onnx.ModelProto, rest: onnx.ModelProto
) -> tuple[dict[str, Any], CutNumbers, dict[str, np.ndarray]]:
    """Step 4 at one cut: its report row, its numbers for selection, and the reconstructions."""
    name = "+".join(cut.tensors)
    spec, x, aux, value_range, settings = ctx.spec, ctx.test.x, ctx.aux, ctx.value_range, ctx.settings
    options = settings.attacks
    clock = _Clock()
    ir_test = clock.run("irs", lambda: run_onnx(front, {spec.input: x}))
    ir_aux = run_onnx(front, {spec.input: aux.x})
    gu = clock.run("gu", lambda: gu_metric(ctx.model, spec.input, x, ir_test, value_range))

    def white_box() -> np.ndarray:
        torch.manual_seed(_seed(settings.seed, name, "rmle"))
        return rmle(to_torch(front), ir_test, spec.sample_shape, value_range, options)

    def black_box() -> np.ndarray:
        return inverse_network(ir_aux, aux.x, ir_test, value_range, options, _seed(settings.seed, name, "inverse"))

    def query_free() -> tuple[np.ndarray, float]:
        seed = _seed(settings.seed, name, "query_free")
        shadow, accuracy = train_shadow(
            to_torch(front), to_torch(rest), aux.x, aux.y, probabilities=ctx.probabilities, settings=options, seed=seed
        )
        return rmle(shadow, ir_test, spec.sample_shape, value_range, options), accuracy

    recon = {"rmle": clock.run("rmle", white_box), "inverse": clock.run("inverse", black_box)}
    recon["query_free"], shadow_accuracy = clock.run("query_free", query_free)
    scores = {attack: image_scores(recon[attack], x, value_range) for attack in ATTACKS}
    probe = clock.run("probe", lambda: label_probe(_flat(ir_aux), aux.y, _flat(ir_test), ctx.test.y))
    readout = readout_agreement(ir_test[0], ctx.predictions, spec.classes) if len(ir_test) == 1 else None
    limit_ssim = ctx.baseline.ssim + settings.margin.ssim
    limit_reid = ctx.baseline.reid + settings.margin.reid
    within = {a: s.ssim <= limit_ssim and s.reid <= limit_reid for a, s in scores.items()}
    attacks_out: dict[str, dict[str, float]] = {a: s.to_dict() for a, s in scores.items()}
    attacks_out["query_free"]["shadow_accuracy"] = round(shadow_accuracy, 4)
    row: dict[str, Any] = {
        "cut": name,
        "tensors": list(cut.tensors),
        "after_op": cut.after_op,
        "position": cut.position,
        "ir_shape": [list(a.shape[1:]) for a in ir_test],
        "ir_values": int(sum(a[0].size for a in ir_test)),
        "gu": None if gu is None else gu.to_dict(),
    }
    if gu is None:
        row["gu_note"] = "undefined: no spatial channels (fully connected)"
    row |= {
        "attacks": attacks_out,
        "within_margin": within,
        "passes": all(within.values()),
        "label_probe": round(probe, 4),
        "readout": None if readout is None else round(readout, 4),
        "seconds": clock.seconds,
    }
    numbers = CutNumbers(
        name, {a: Score(s.ssim, s.reid) for a, s in scores.items()}, readout, None if gu is None else gu.below_delta
    )
    keep = slice(0, settings.examples)
    return row, numbers, {attack: recon[attack][keep] for attack in ATTACKS}


def assess(
    model: onnx.ModelProto,
    test: Dataset,
    aux: Dataset,
    *,
    cuts: Sequence[Sequence[str]] | None = None,
    settings: Settings | None = None,
    progress: Progress | None = None,
) -> Assessment:
    """Measure at each cut how much of the input its IR leaks, and choose the front and back cuts.

    Args:
        model: the whole model: one float input ``[N, C, H, W]``, first output ``[N, classes]``.
        test: the inputs whose leakage is measured (labels: for the baselines and the probe).
        aux: the attacker's own labelled data, disjoint from ``test``.
        cuts: tensor-name lists, one per cut; None for ``auto`` (see :mod:`~sealedml.partition.assess.cuts`).
        settings: seed, margin, sample count and attack parameters (default: :class:`Settings`).
        progress: called with a line per step (e.g. ``print`` to stderr); default silent.

    Returns:
        The :class:`Assessment`.

    Raises:
        ConfigurationError: data that does not fit the model, a cut that does not separate it
            (``PartitionError``), or an operator the translator refuses (``TranslationError``).
    """
    settings = settings or Settings()
    say = progress or _quiet
    started = time.perf_counter()
    spec = ModelSpec.of(model)
    spec.check(test)
    spec.check(aux)
    chosen = resolve_cuts(model, cuts)
    slicer = Slicer(model)
    parts = [(cut, slicer.front(cut), slicer.rest(cut)) for cut in chosen]
    for _, front, rest in parts:  # refuse an unsupported operator before the long steps
        to_torch(front)
        to_torch(rest)
    if len(test) > settings.samples:
        rng = np.random.default_rng(settings.seed)
        test = test.subset(np.sort(rng.choice(len(test), settings.samples, replace=False)))
    value_range = (float(aux.x.min()), float(aux.x.max()))
    if value_range[1] <= value_range[0]:
        raise ConfigurationError(f"{aux.source}: every input value is the same; nothing to reconstruct")
    x, y = test.x, test.y
    outputs = run_onnx(model, {spec.input: x})[0]
    probabilities = bool(np.all(outputs >= 0) and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3))
    predictions = np.argmax(class_probabilities(outputs), axis=1)
    dataset_mean, class_mean = mean_images(aux.x, aux.y, y, spec.classes)
    baselines = {
        "dataset_mean": image_scores(dataset_mean, x, value_range),
        "class_mean": image_scores(class_mean, x, value_range),
    }
    baseline = Score(baselines[settings.baseline].ssim, baselines[settings.baseline].reid)
    ctx = _Context(model, spec, test, aux, value_range, probabilities, predictions, baseline, settings)
    setup_s = time.perf_counter() - started
    reconstructions: dict[str, dict[str, np.ndarray]] = {}
    rows: list[dict[str, Any]] = []
    numbers: list[CutNumbers] = []
    for i, (cut, front, rest) in enumerate(parts):
        say(f"[{i + 1}/{len(parts)}] {'+'.join(cut.tensors)}: Gu metric, rMLE, inverse network, query-free, probe")
        row, cut_numbers, recon = _one_cut(ctx, cut, front, rest)
        rows.append(row)
        numbers.append(cut_numbers)
        reconstructions[row["cut"]] = recon
        attacks = row["attacks"]
        say(
            f"[{i + 1}/{len(parts)}] {row['cut']}: "
            + ", ".join(f"{a} ssim {attacks[a]['ssim']:.3f} re-id {attacks[a]['reid']:.3f}" for a in ATTACKS)
            + f" ({sum(row['seconds'].values()):.1f} s)"
        )
    front_choice = choose_front(numbers, baseline, settings.margin)
    back_choice = choose_back(numbers, front_choice.index)
    gu_choice = choose_gu(numbers)
    total = time.perf_counter() - started
    result: dict[str, Any] = {
        "model": model.graph.name or "model",
        "input": {"name": spec.input, "shape": list(spec.sample_shape), "value_range": list(value_range)},
        "output": {"name": spec.output, "classes": spec.classes, "probabilities": probabilities},
        "test_samples": len(test),
        "aux_samples": len(aux),
        "model_accuracy": round(float(np.mean(predictions == y)), 4),
        "majority_rate": round(float(np.bincount(y).max() / len(y)), 4),
        "chance_reid": round(1.0 / len(test), 4),
        "baselines": {k: v.to_dict() for k, v in baselines.items()},
        "cuts": rows,
        "chosen_front": front_choice.cut,
        "front_decision": {
            "deciding_attack": front_choice.deciding_attack,
            "deciding_cut": front_choice.deciding_cut,
            "metric": front_choice.metric,
            "value": None if front_choice.value is None else round(front_choice.value, 4),
            "limit": None if front_choice.limit is None else round(front_choice.limit, 4),
            "failing": list(front_choice.failing),
            "reason": front_choice.reason,
        },
        "chosen_back": back_choice.cut,
        "back_decision": {
            "criterion": back_choice.criterion,
            "readout_cut": back_choice.readout_cut,
            "reason": back_choice.reason,
        },
        "gu_front": gu_choice.cut,
        "gu_decision": gu_choice.reason,
        "settings": {
            "seed": settings.seed,
            "margin": {"ssim": settings.margin.ssim, "reid": settings.margin.reid},
            "baseline": settings.baseline,
            "samples": settings.samples,
            "cuts": "auto" if cuts is None else ",".join("+".join(c) for c in cuts),
            **settings.attacks.to_dict(),
        },
        "timings": {
            "setup_s": round(setup_s, 3),
            "cuts_s": {row["cut"]: round(sum(row["seconds"].values()), 3) for row in rows},
            "threads": torch.get_num_threads(),
        },
        "total_seconds": round(total, 2),
    }
    return Assessment(result, x[: settings.examples].copy(), reconstructions)
