"""SealedML: confidential, serverless machine-learning inference.

Owners seal ONNX models; a KeyService running in a TEE releases the keys only to
attested runtime instances, for users the owner granted and who consented.
See ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

#: The public API (docs/sdk.md): names and the modules they live in, loaded on first use so that
#: ``import sealedml`` stays light (no ONNX Runtime, no HTTP client) for the runtime's own imports.
_EXPORTS = {
    "Owner": "sealedml.sdk",
    "User": "sealedml.sdk",
    "runtime_measurement": "sealedml.sdk",
    "Identity": "sealedml.client.identity",
    "Error": "sealedml.errors",
    "AccessDenied": "sealedml.errors",
    "AuthenticationError": "sealedml.errors",
    "ConfigurationError": "sealedml.errors",
    "InputError": "sealedml.errors",
    "NotFound": "sealedml.errors",
    "Overloaded": "sealedml.errors",
    "ServiceUnavailable": "sealedml.errors",
    "VerificationError": "sealedml.errors",
}

__all__ = ["__version__", *_EXPORTS]

# ONNX Runtime's wheels (1.32) ship Microsoft's 1DS telemetry: importing the library writes a
# session file into the temporary directory and a device id under ~/.cache, and it is built to
# send events to mobile.events.data.microsoft.com. A confidential-inference runtime must not
# phone home with metadata about what it serves, so it is off unless the operator sets
# ORT_DISABLE_TELEMETRY=0 explicitly. Set here, before any of our modules imports onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Load an exported name on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sealedml' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
