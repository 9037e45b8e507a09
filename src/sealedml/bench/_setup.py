"""Publishing a model to a benchmark stack (owner + one granted, consenting user)."""

from __future__ import annotations

from typing import Any

import onnx

from sealedml.bench._harness import BenchStack

__all__ = ["publish_for_user"]


def publish_for_user(stack: BenchStack, model: onnx.ModelProto, model_ids: list[str]) -> Any:
    """Seal ``model`` under each id, allow this build's runtime; return the user identity."""
    from sealedml.attestation.measurement import measurement_for
    from sealedml.client.identity import Identity
    from sealedml.client.keyservice import KeyServiceClient
    from sealedml.client.owner import publish_model
    from sealedml.storage.modelstore import LocalModelStore

    owner, user = Identity.generate(), Identity.generate()
    runtime = measurement_for("runtime", {"tee": "simulated"})
    with KeyServiceClient(stack.keyservice.url, owner) as oks, KeyServiceClient(stack.keyservice.url, user) as uks:
        oks.register()
        uks.register()
        for model_id in model_ids:
            publish_model(model, model_id=model_id, keyservice=oks, store=LocalModelStore(stack.store))
            oks.allow_runtime(model_id, runtime)
            oks.grant(model_id, user.principal_id)
            uks.enable(model_id, [runtime])
    return user
