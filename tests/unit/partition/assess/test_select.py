"""Choosing the front and back cuts from synthetic per-cut numbers."""

from __future__ import annotations

import pytest

from sealedml.partition.assess.select import (
    CutNumbers,
    Margin,
    Score,
    choose_back,
    choose_front,
    choose_gu,
    parse_margin,
)

BASE = Score(ssim=0.5, reid=0.01)
MARGIN = Margin(ssim=0.05, reid=0.05)
SAFE = Score(0.5, 0.02)


def _cut(name: str, readout: float | None = None, gu: float | None = None, **attacks: Score) -> CutNumbers:
    scores = {"rmle": SAFE, "inverse": SAFE, "query_free": SAFE} | attacks
    return CutNumbers(name, scores, readout, gu)


def test_the_earliest_passing_cut_is_chosen_and_the_last_attack_over_the_margin_named() -> None:
    cuts = [
        _cut("c1", rmle=Score(0.99, 1.0), inverse=Score(0.9, 0.9)),
        _cut("c2", inverse=Score(0.7, 0.3), query_free=Score(0.56, 0.02)),
        _cut("c3"),
        _cut("c4", inverse=Score(0.9, 0.8)),  # leaks again later: does not matter, only c3's IR leaves
    ]
    choice = choose_front(cuts, BASE, MARGIN)
    assert (choice.cut, choice.index) == ("c3", 2)
    assert choice.deciding_attack == "inverse"  # largest excess at c2: re-id 0.3 > 0.06
    assert choice.deciding_cut == "c2"
    assert (choice.metric, choice.value, choice.limit) == ("reid", 0.3, pytest.approx(0.06))
    assert choice.failing == ("inverse", "query_free")
    assert "c2" in choice.reason and "inverse" in choice.reason


def test_margins_are_inclusive_and_apply_to_ssim_too() -> None:
    at_limit = _cut("c1", rmle=Score(0.55, 0.06))
    assert choose_front([at_limit], BASE, MARGIN).cut == "c1"
    ssim_only = _cut("c1", rmle=Score(0.6, 0.01))
    choice = choose_front([ssim_only, _cut("c2")], BASE, MARGIN)
    assert (choice.cut, choice.deciding_attack, choice.metric) == ("c2", "rmle", "ssim")


def test_a_first_cut_that_passes_has_no_deciding_attack() -> None:
    choice = choose_front([_cut("c1"), _cut("c2")], BASE, MARGIN)
    assert (choice.cut, choice.deciding_attack) == ("c1", None)
    assert "already" in choice.reason


def test_when_no_cut_passes_nothing_is_chosen_and_the_reason_names_the_attack() -> None:
    cuts = [_cut("c1", rmle=Score(0.9, 0.9)), _cut("c2", inverse=Score(0.8, 0.4), rmle=Score(0.5, 0.1))]
    choice = choose_front(cuts, BASE, MARGIN)
    assert choice.cut is None and choice.index is None
    assert (choice.deciding_attack, choice.deciding_cut, choice.metric) == ("inverse", "c2", "reid")
    assert choice.failing == ("inverse", "rmle")
    assert choice.reason.startswith("no assessed cut")
    assert choose_front([], BASE, MARGIN).cut is None


def test_the_back_cut_is_the_last_before_the_label_is_readable() -> None:
    cuts = [_cut("c1"), _cut("c2"), _cut("fc", readout=None), _cut("logits", readout=1.0)]
    choice = choose_back(cuts, front=0)
    assert (choice.cut, choice.readout_cut, choice.criterion) == ("fc", "logits", "direct readout")
    assert "logits" in choice.reason


def test_a_weak_readout_does_not_count() -> None:
    cuts = [_cut("c1"), _cut("c2", readout=0.6), _cut("c3")]
    assert choose_back(cuts, front=0).cut == "c3"  # 0.6 < 0.99: the readout is the model's output


def test_no_back_cut_when_nothing_lies_between_front_and_readout() -> None:
    cuts = [_cut("c1"), _cut("logits", readout=1.0)]
    assert choose_back(cuts, front=0).cut is None
    assert choose_back(cuts, front=None).cut == "c1"


def test_gu_rule_needs_every_input_at_or_above_delta() -> None:
    cuts = [_cut("c1", gu=1.0), _cut("c2", gu=0.3), _cut("fc", gu=None), _cut("c3", gu=0.0)]
    assert choose_gu(cuts).cut == "c3"
    assert choose_gu(cuts[:3]).cut is None and "30%" in choose_gu(cuts[:3]).reason
    assert choose_gu([_cut("fc")]).cut is None


def test_margin_syntax() -> None:
    assert parse_margin("0.1") == Margin(0.1, 0.1)
    assert parse_margin("ssim=0.2,reid=0.01") == Margin(0.2, 0.01)
    assert parse_margin("reid=0.02") == Margin(0.05, 0.02)
    for bad in ("x", "ssim=2", "psnr=3", "-0.1"):
        with pytest.raises(ValueError):
            parse_margin(bad)
