"""Memory-bounded serving through real processes: a gateway whose instances run
models within ``--memory-budget``, keep their weight spill in ``--spill-dir`` and keep only
zeros in their weight arenas between requests (``--no-warm-first-segment``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from sealedml import zoo
from sealedml.errors import InputError
from tests.conftest import Stack, _make_stack

pytestmark = pytest.mark.slow

BUDGET = 2_000_000


@pytest.fixture(scope="module")
def spill_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spill")


@pytest.fixture(scope="module")
def bounded_stack(tmp_path_factory: pytest.TempPathFactory, spill_dir: Path) -> Iterator[Stack]:
    extra = ["--memory-budget", "2MB", "--spill-dir", str(spill_dir), "--no-warm-first-segment"]
    yield from _make_stack(tmp_path_factory.mktemp("stack-bounded"), platform_extra=extra)


def _open_files_under(directory: Path) -> list[str]:
    """Targets of every file descriptor (of this user's processes) that points into ``directory``."""
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:  # another user's process, or it exited meanwhile
            continue
        found += [link for link in links if link.startswith(str(directory) + "/")]
    return found


def test_digits_within_a_budget_match_plaintext_and_spill_to_the_directory(bounded_stack, spill_dir, unique_id):
    _, owner_ks = bounded_stack.principal()
    user, user_ks = bounded_stack.principal()
    dm = zoo.digits()
    model_id = unique_id("digits")
    bounded_stack.publish(owner_ks, dm.model, model_id, users=[(user, user_ks)])
    client = bounded_stack.infer_client(user)
    x = dm.x_test[:12]
    plain = ort.InferenceSession(dm.model.SerializeToString()).run(None, {"input": x})
    for i in range(len(x)):  # instances plan for batch 1
        out = client.infer(model_id, x[i : i + 1])
        np.testing.assert_array_equal(out["label"], plain[0][i : i + 1])
        np.testing.assert_allclose(out["probabilities"], plain[1][i : i + 1], atol=1e-4)
        assert client.last_peak_bytes is not None and 0 < client.last_peak_bytes <= BUDGET
    with pytest.raises(InputError, match="allows at most 1"):
        client.infer(model_id, x)  # a larger batch than planned is refused, not run over budget
    # The instance keeps the re-encrypted weights in an anonymous file there (never named).
    assert list(spill_dir.iterdir()) == []
    assert any(link.endswith("(deleted)") for link in _open_files_under(spill_dir.resolve()))
    # Every instance got the gateway's memory flags and says so.
    functions = httpx.get(f"{bounded_stack.gateway.url}/v1/stats", timeout=10).json()["functions"]
    instances = [instance for function in functions.values() for instance in function["instances"]]
    assert instances
    for instance in instances:
        stats = httpx.get(f"{instance['url']}/v1/stats", timeout=10).json()
        assert stats["memory_budget"] == BUDGET and stats["spill"] == "file"
        assert stats["warm_first_segment"] is False
