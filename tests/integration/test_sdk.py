"""The Python API (`import sealedml`) against real processes: an owner and a user, as docs/sdk.md shows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import sealedml
from tests.conftest import Stack

pytestmark = pytest.mark.slow


def test_import_sealedml_is_light_and_exports_the_api():
    """`import sealedml` loads neither ONNX Runtime nor an HTTP client; the names resolve on first use."""
    code = (
        "import sys, sealedml; "
        "assert 'onnxruntime' not in sys.modules and 'httpx' not in sys.modules, sorted(sys.modules); "
        "names = [sealedml.Owner, sealedml.User, sealedml.Identity, sealedml.AccessDenied, sealedml.Error]; "
        "assert issubclass(sealedml.AccessDenied, sealedml.Error); print(len(names))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr
    assert set(sealedml.__all__) >= {"Owner", "User", "Identity", "Error", "AccessDenied", "InputError", "__version__"}
    with pytest.raises(AttributeError):
        sealedml.NoSuchThing  # noqa: B018


def test_an_owner_and_a_user_through_the_api(stack: Stack, tmp_path, unique_id):
    from sealedml import zoo

    model_id = unique_id("sdk")
    owner_file, user_file = tmp_path / "owner.json", tmp_path / "user.json"
    sealedml.Identity.generate().save(owner_file)
    sealedml.Identity.generate().save(user_file)
    owner = sealedml.Owner(stack.keyservice.url, owner_file)
    user = sealedml.User(stack.keyservice.url, user_file, gateway=stack.gateway.url)
    owner.register()
    user.register()
    path = tmp_path / "toy.onnx"
    path.write_bytes(zoo.toy_multi_io().SerializeToString())
    published = owner.publish(model_id, path, store=stack.store)
    assert published.version == 1
    owner.grant(model_id, user.principal_id)
    user.enable(model_id)

    x = np.ones((2, 4), np.float32)
    idx = np.arange(2, dtype=np.int64)
    with pytest.raises(sealedml.AccessDenied, match="no_runtime_allowed"):  # the owner forgot allow_runtime
        user.infer(model_id, {"x": x, "idx": idx})
    owner.allow_runtime(model_id)
    outputs = user.infer(model_id, {"x": x, "idx": idx})
    assert outputs["idx_plus_one"].tolist() == [1, 2]
    info = user.info(model_id)
    assert info.access == "ok" and [t.name for t in info.inputs] == ["x", "idx"]
    reasons = [r.event.get("reason", "") for r in owner.audit(model_id)]
    assert any(reason.endswith("owner allows no runtime measurement") for reason in reasons)
    owner.revoke(model_id, user.principal_id)
    with pytest.raises(sealedml.AccessDenied):
        user.info(model_id)
    with pytest.raises(sealedml.InputError, match="cannot load"):
        empty = tmp_path / "bad.onnx"
        empty.write_bytes(b"junk")
        owner.publish(model_id, empty, store=stack.store)
