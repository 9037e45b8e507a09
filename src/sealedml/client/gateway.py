"""Encrypted inference through the gateway, as a user."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sealedml._internal.http import PEAK_BYTES_HEADER, SERVER_TIMING_HEADER, check_url, raise_for_error
from sealedml._internal.httpclient import FastClient, TransportError
from sealedml.client.identity import Identity
from sealedml.envelope.request import BINARY_CONTENT_TYPE, ResponseEnvelope, open_response, seal_request_binary
from sealedml.errors import InputError, ServiceUnavailable

__all__ = ["InferenceClient"]


class InferenceClient:
    """Seal requests for a model, send them to the gateway, open the answers.

    Args:
        gateway: the gateway base URL.
        identity: the user.
        timeout: seconds per request (cold starts included).
    """

    def __init__(
        self, gateway: str, identity: Identity, *, timeout: float = 300.0, max_request: int | None = None
    ) -> None:
        from sealedml._internal.limits import max_request as default_limit

        self.identity = identity
        #: The largest request sent (``--max-request``, ``SEALEDML_MAX_REQUEST``, 64 MiB); larger ones are
        #: refused here, before their upload, in the words the gateway would use.
        self.max_request = max_request or default_limit()
        self.url = check_url(gateway, "the gateway URL (--gateway)")
        self._http = FastClient(self.url, timeout=timeout)
        self.last_cold_start = False
        self.last_server_timing = ""
        self.last_peak_bytes: int | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def infer(
        self, model_id: str, inputs: Mapping[str, np.ndarray] | list[np.ndarray] | np.ndarray
    ) -> dict[str, np.ndarray]:
        """Run ``model_id`` on ``inputs`` (named dict, or unnamed array(s) in input order).

        Raises:
            AccessDenied: no grant, no consent, or revoked.
            EnvelopeError / SealedModelError / InputError: as reported by the runtime.
            ServiceUnavailable / Overloaded: platform trouble.
        """
        if isinstance(inputs, np.ndarray):
            tensors, positional = {"0": inputs}, True
        elif isinstance(inputs, list):
            tensors, positional = {str(i): a for i, a in enumerate(inputs)}, True
        else:
            tensors, positional = dict(inputs), False
        # Sealed and framed in one pass: the tensors are encrypted straight into the body.
        body, context = seal_request_binary(
            tensors,
            request_key=self.identity.request_key(model_id),
            model_id=model_id,
            user_id=self.identity.principal_id,
            is_positional=positional,
        )
        if len(body) > self.max_request:
            from sealedml._internal.limits import too_large

            raise InputError(too_large(len(body), self.max_request, "this client's", "infer --max-request"))
        try:
            response = self._http.post("/v1/infer", content=body, headers={"content-type": BINARY_CONTENT_TYPE})
        except TransportError as exc:
            raise ServiceUnavailable(
                f"gateway at {self.url} unreachable ({type(exc).__name__}): "
                "is the platform running, and is the URL right?"
            ) from exc
        raise_for_error(response, f"the gateway at {self.url}")
        self.last_cold_start = response.headers.get("x-sealedml-cold-start") == "1"
        self.last_server_timing = response.headers.get(SERVER_TIMING_HEADER, "")
        peak = response.headers.get(PEAK_BYTES_HEADER)
        self.last_peak_bytes = int(peak) if peak and peak.isdigit() else None
        return open_response(context, ResponseEnvelope.parse(response.content))
