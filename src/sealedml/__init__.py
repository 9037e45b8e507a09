"""SealedML: confidential, serverless machine-learning inference.

Owners seal ONNX models; a KeyService running in a TEE releases the keys only to
attested runtime instances, for users the owner granted and who consented.
See ``docs/architecture.md``.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
