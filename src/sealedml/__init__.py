"""SealedML: confidential, serverless machine-learning inference.

Owners seal ONNX models; a KeyService running in a TEE releases the keys only to
attested runtime instances, for users the owner granted and who consented.
See ``docs/architecture.md``.
"""

from __future__ import annotations

import os

__all__ = ["__version__"]

# ONNX Runtime's wheels (1.32) ship Microsoft's 1DS telemetry: importing the library writes a
# session file into the temporary directory and a device id under ~/.cache, and it is built to
# send events to mobile.events.data.microsoft.com. A confidential-inference runtime must not
# phone home with metadata about what it serves, so it is off unless the operator sets
# ORT_DISABLE_TELEMETRY=0 explicitly. Set here, before any of our modules imports onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
