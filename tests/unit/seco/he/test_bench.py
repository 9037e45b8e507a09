"""``sealedml bench seco``: one short real run (HE engine processes) and its refusals."""

from __future__ import annotations

import pytest

from sealedml.bench.seco import run_seco
from sealedml.cli.main import main


def test_a_short_run_reports_times_bytes_per_link_and_accuracy(he_interpreter: str) -> None:
    result = run_seco("digits-mlp", queries=2, tee_path=False, quiet=True)
    assert result["exact_fixed_point"] == "2/2"
    assert result["offline_s"] > 0 and result["online_ms"] > 0 and result["user_cpu_ms"] >= 0
    assert set(result["bytes_per_link"]) == {"U-A", "A-B", "A-C", "B-C"}
    assert all(v > 0 for v in result["bytes_per_link"].values())
    assert result["test_split"]["fixed_point_accuracy"] >= result["test_split"]["plaintext_accuracy"] - 0.005
    assert result["relus_per_query"] == 32 and result["tee_path_ms"] is None
    assert isinstance(result["target_met"], bool)


@pytest.mark.parametrize(("argv", "message"), [(["--queries", "0"], "--queries must be ≥ 1")])
def test_bad_flags_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "seco", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
