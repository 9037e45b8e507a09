"""The Python API for the people behind a model: :class:`Owner` and :class:`User`.

Both talk to a KeyService whose attestation they verify first (every call), as the
command line does; :class:`User` also sends encrypted requests through a gateway.
They take an identity file (or an :class:`~sealedml.client.identity.Identity`) and
URLs, and raise the typed errors of :mod:`sealedml.errors`::

    import sealedml

    owner = sealedml.Owner("http://127.0.0.1:8000", "owner.json")
    owner.register()
    owner.publish("digits", "digits.onnx", store="store")
    owner.allow_runtime("digits")                      # this build's simulated runtime
    owner.grant("digits", user_id)

    user = sealedml.User("http://127.0.0.1:8000", "user.json", gateway="http://127.0.0.1:8080")
    user.register()
    user.enable("digits")
    outputs = user.infer("digits", {"input": x})       # {"label": ..., "probabilities": ...}

A denial raises :class:`~sealedml.errors.AccessDenied`; for a granted user its message
names the category (``user.info(model_id).access``), and the owner reads the exact
reason with :meth:`Owner.audit`. See docs/sdk.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sealedml.errors import AccessDenied, ConfigurationError

if TYPE_CHECKING:
    from sealedml.attestation.trust import KeyServiceTrust
    from sealedml.client.identity import Identity
    from sealedml.client.keyservice import KeyServiceClient
    from sealedml.client.owner import PublishedModel
    from sealedml.protocol.keyservice import ModelAuditRecord, ModelInfoResponse

__all__ = ["Owner", "User", "runtime_measurement"]


def runtime_measurement() -> str:
    """This build's runtime measurement in the simulated TEE (what a local platform's instances report)."""
    from sealedml.attestation.measurement import measurement_for

    return measurement_for("runtime", {"tee": "simulated"})


def _identity(identity: Identity | str | Path) -> Identity:
    from sealedml.client.identity import Identity

    return identity if isinstance(identity, Identity) else Identity.load(Path(identity))


class _Principal:
    """What owners and users share: an identity, and a KeyService they attest."""

    def __init__(
        self, keyservice: str, identity: Identity | str | Path, *, trust: KeyServiceTrust | None = None
    ) -> None:
        from sealedml._internal.http import check_url

        self.keyservice_url = check_url(keyservice, "the KeyService URL")
        self.identity = _identity(identity)
        self._trust = trust

    @property
    def principal_id(self) -> str:
        """This principal's id (give it to an owner to be granted)."""
        return self.identity.principal_id

    def _keyservice(self) -> KeyServiceClient:
        from sealedml.client.keyservice import KeyServiceClient

        return KeyServiceClient(self.keyservice_url, self.identity, trust=self._trust)

    def register(self) -> str:
        """Register this identity with the KeyService (idempotent); its principal id."""
        with self._keyservice() as ks:
            return ks.register()

    def info(self, model_id: str) -> ModelInfoResponse:
        """What this principal may know about a model (``model info``).

        Raises:
            AccessDenied: neither the owner nor granted.
        """
        with self._keyservice() as ks:
            return ks.model_info(model_id)


class Owner(_Principal):
    """A model owner: publishes sealed models and decides who may use them, on which runtimes.

    Args:
        keyservice: the KeyService's URL.
        identity: an identity file (``sealedml identity new``) or an ``Identity``.
        trust: which KeyService to trust (default: this build's, simulated TEE).
    """

    def publish(
        self, model_id: str, model: str | Path | Any, *, store: str | Path, version: int | None = None
    ) -> PublishedModel:
        """Check that the model loads, seal it, store it and upload its key (``model seal``).

        Args:
            model_id: the model's id (first come, first owned).
            model: an ``.onnx`` or ``.tflite`` path, or an ``onnx.ModelProto``.
            store: the model store directory the platform serves from.
            version: default: the next one.

        Raises:
            InputError: ONNX Runtime (or LiteRT) cannot load the model; nothing is sealed.
        """
        from sealedml.client.model_check import check_model_file, is_tflite_file
        from sealedml.client.owner import load_model_file, publish_model
        from sealedml.storage.modelstore import LocalModelStore

        signature = None
        if isinstance(model, str | Path):
            signature = check_model_file(Path(model))
            # .tflite bytes are sealed unmodified; an .onnx file is read tensor by tensor, never loaded
            model = load_model_file(Path(model)) if is_tflite_file(Path(model)) else Path(model)
        with self._keyservice() as ks:
            return publish_model(
                model, model_id=model_id, keyservice=ks, store=LocalModelStore(Path(store)), version=version,
                signature=signature,
            )  # fmt: skip

    def allow_runtime(self, model_id: str, measurement: str | None = None, *, tee: str | None = None) -> None:
        """Allow a runtime (default: this build's simulated runtime) to receive the model's key."""
        with self._keyservice() as ks:
            ks.allow_runtime(model_id, measurement or runtime_measurement(), tee=tee)

    def disallow_runtime(self, model_id: str, measurement: str, *, tee: str | None = None) -> None:
        """Remove a runtime from the model's allow-list."""
        with self._keyservice() as ks:
            ks.allow_runtime(model_id, measurement, tee=tee, allow=False)

    def grant(self, model_id: str, user_id: str) -> None:
        """Grant a registered user access to the model.

        Raises:
            NotFound: the user is not registered.
        """
        with self._keyservice() as ks:
            ks.grant(model_id, user_id)

    def revoke(self, model_id: str, user_id: str) -> None:
        """Revoke a user: their keys are no longer released (leases end within their TTL)."""
        with self._keyservice() as ks:
            ks.grant(model_id, user_id, grant=False)

    def audit(self, model_id: str, *, since: int = 0, limit: int | None = None) -> list[ModelAuditRecord]:
        """The KeyService's audit records about the model, oldest first (all of them unless ``limit``)."""
        records: list[ModelAuditRecord] = []
        with self._keyservice() as ks:
            while limit is None or len(records) < limit:
                page = ks.model_audit(model_id, since=since, limit=min(1000, (limit or 1000) - len(records)))
                records.extend(page.records)
                if page.next_since is None:
                    break
                since = page.next_since
        return records


class User(_Principal):
    """A user of sealed models: consents to runtimes and sends encrypted requests.

    Args:
        keyservice: the KeyService's URL.
        identity: an identity file or an ``Identity``.
        gateway: the platform gateway's URL (needed for :meth:`infer`).
        trust: which KeyService to trust (default: this build's, simulated TEE).
    """

    def __init__(
        self,
        keyservice: str,
        identity: Identity | str | Path,
        *,
        gateway: str | None = None,
        trust: KeyServiceTrust | None = None,
    ) -> None:
        super().__init__(keyservice, identity, trust=trust)
        self.gateway = gateway

    def enable(
        self,
        model_id: str,
        measurements: Sequence[str] | None = None,
        *,
        tee: str | None = None,
        accept_partitioned: bool = False,
    ) -> None:
        """Upload this user's request key for the model and consent to runtimes (default: this build's)."""
        with self._keyservice() as ks:
            ks.enable(
                model_id, list(measurements or [runtime_measurement()]), tee=tee, accept_partitioned=accept_partitioned
            )

    def infer(
        self, model_id: str, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray
    ) -> dict[str, np.ndarray]:
        """Run the model on ``inputs`` (by name, or positional), end-to-end encrypted; its outputs by name.

        Raises:
            AccessDenied: the message names the category (not enabled, no runtime allowed, ...).
            InputError: inputs the model refuses (the runtime's reason).
            ServiceUnavailable: the gateway cannot be reached.
        """
        from sealedml.client.gateway import InferenceClient

        if self.gateway is None:
            raise ConfigurationError("User(..., gateway=URL) is needed to infer")
        with InferenceClient(self.gateway, self.identity) as client:
            try:
                return client.infer(model_id, inputs)  # type: ignore[arg-type]
            except AccessDenied:
                raise AccessDenied(self._denial(model_id)) from None

    def _denial(self, model_id: str) -> str:
        from sealedml.client.keyservice import describe_denial

        try:
            return describe_denial(self.info(model_id))
        except AccessDenied:
            return describe_denial(None)
