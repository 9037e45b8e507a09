"""The whole path through real processes: KeyService, gateway, worker processes."""

from __future__ import annotations

import numpy as np
import pytest

from sealedml import zoo
from sealedml.errors import AccessDenied, InputError

pytestmark = pytest.mark.slow


def test_toy_model_multi_io_roundtrip(stack, toy_model, unique_id):
    owner, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    model_id = unique_id()
    stack.publish(owner_ks, toy_model, model_id, users=[(user, user_ks)])
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    idx = np.array([1, 5, -2], dtype=np.int64)
    out = stack.infer_client(user).infer(model_id, {"x": x, "idx": idx})
    assert set(out) == {"y", "idx_plus_one"}
    np.testing.assert_array_equal(out["idx_plus_one"], idx + 1)
    assert out["idx_plus_one"].dtype == np.int64
    assert out["y"].shape == (3, 3) and out["y"].dtype == np.float32
    # dynamic batch: another batch size through the same warm session
    out1 = stack.infer_client(user).infer(model_id, {"x": x[:1], "idx": idx[:1]})
    np.testing.assert_allclose(out1["y"], out["y"][:1], rtol=1e-6)


def test_digits_matches_plaintext(stack, unique_id):
    owner, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    dm = zoo.digits()
    model_id = unique_id("digits")
    stack.publish(owner_ks, dm.model, model_id, users=[(user, user_ks)])
    out = stack.infer_client(user).infer(model_id, dm.x_test[:40])  # positional single input
    import onnxruntime as ort

    plain = ort.InferenceSession(dm.model.SerializeToString()).run(None, {"input": dm.x_test[:40]})
    np.testing.assert_array_equal(out["label"], plain[0])
    np.testing.assert_allclose(out["probabilities"], plain[1], rtol=1e-5, atol=1e-6)


def test_wrong_inputs_are_a_clear_error(stack, toy_model, unique_id):
    owner, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    model_id = unique_id()
    stack.publish(owner_ks, toy_model, model_id, users=[(user, user_ks)])
    client = stack.infer_client(user)
    with pytest.raises(InputError, match="missing"):
        client.infer(model_id, {"x": np.zeros((1, 4), np.float32)})
    with pytest.raises(InputError, match="idx"):
        client.infer(model_id, {"x": np.zeros((1, 4), np.float32), "idx": np.zeros(1, np.float32)})


def test_user_without_grant_is_denied(stack, toy_model, unique_id):
    owner, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    stranger, stranger_ks = stack.principal()
    model_id = unique_id()
    stack.publish(owner_ks, toy_model, model_id, users=[(user, user_ks)])
    from sealedml.attestation.measurement import measurement_for

    stranger_ks.enable(model_id, [measurement_for("runtime", {"tee": "simulated"})])
    with pytest.raises(AccessDenied):
        stack.infer_client(stranger).infer(model_id, {"x": np.zeros((1, 4), np.float32), "idx": np.zeros(1, np.int64)})


def test_instances_run_in_an_empty_private_directory(stack, toy_model, unique_id):
    """Nothing a model could name by a relative path is in an instance's working directory."""
    import os
    import stat
    from pathlib import Path

    import httpx

    owner, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    model_id = unique_id()
    stack.publish(owner_ks, toy_model, model_id, users=[(user, user_ks)])
    stack.infer_client(user).infer(model_id, {"x": np.ones((1, 4), np.float32), "idx": np.array([1], np.int64)})
    functions = httpx.get(f"{stack.gateway.url}/v1/stats", timeout=30).json()["functions"]
    pids = [i["pid"] for f in functions.values() for i in f["instances"]]
    assert pids
    for pid in pids:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        assert cwd.name.startswith("sealedml-worker-") and list(cwd.iterdir()) == []
        assert stat.S_IMODE(cwd.stat().st_mode) == 0o700
