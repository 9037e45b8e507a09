"""The Model Assessment Framework: how much of the input the IR at each candidate cut leaks.

Gu et al.'s ternary partitioning keeps the front and back of a model in the TEE; the host sees
the IR at the front cut. This package measures, per cut, what that IR gives away:

* Gu et al.'s own KL metric, reported faithfully (:mod:`.gu`);
* three reconstruction attacks of He, Zhang & Lee — white-box rMLE, a black-box inverse
  network, a query-free shadow front — scored by SSIM, PSNR and re-identification beside the
  dataset-mean and class-mean baselines (:mod:`.attacks`, :mod:`.metrics`);
* a logistic-regression label probe and the direct (argmax) readout of the label.

It then chooses the earliest front cut where every attack stays within a margin of the baseline
and the back cut before the label becomes readable (:mod:`.select`). Leakage is measured against
these attacks only: nothing here is a proof that a cut is safe. Needs torch and scikit-image
(``pip install 'sealedml[assess]'``).

Calling it::

    from sealedml.partition.assess import Settings, assess, load_dataset
    result = assess(model, load_dataset(test_npz), load_dataset(aux_npz), settings=Settings(seed=0)).to_dict()

``result`` is what ``sealedml partition assess --json`` prints. See docs/partition.md.
"""

from __future__ import annotations

from sealedml.partition.assess.attacks import ATTACKS, AttackSettings
from sealedml.partition.assess.cuts import parse_cuts
from sealedml.partition.assess.data import Dataset, ModelSpec, load_dataset
from sealedml.partition.assess.report import format_table, plot
from sealedml.partition.assess.run import Assessment, Settings, assess
from sealedml.partition.assess.select import Margin, parse_margin
from sealedml.partition.assess.torch_graph import TranslationError, to_torch

__all__ = [
    "ATTACKS",
    "Assessment",
    "AttackSettings",
    "Dataset",
    "Margin",
    "ModelSpec",
    "Settings",
    "TranslationError",
    "assess",
    "format_table",
    "load_dataset",
    "parse_cuts",
    "parse_margin",
    "plot",
    "to_torch",
]
