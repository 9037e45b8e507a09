"""Threshold homomorphic encryption for SECO's linear layers (OpenFHE, in a side process).

* :mod:`.sidecar` — one party's engine, a script run under Python 3.10 where OpenFHE imports;
* :mod:`.client` — starting it and speaking to it (:class:`HeSidecar`, :class:`HeEngineError`);
* :mod:`.packing` — where a matrix and a vector go in the slots, every slot masked;
* :mod:`.threshold` — 3-party key generation and one masked product (:class:`ThresholdSession`).
"""

from sealedml.seco.he.client import HeEngineError, HeSidecar, he_python
from sealedml.seco.he.packing import MatvecLayout
from sealedml.seco.he.threshold import SECO_MODULUS, LinearShares, ThresholdSession

__all__ = [
    "SECO_MODULUS",
    "HeEngineError",
    "HeSidecar",
    "LinearShares",
    "MatvecLayout",
    "ThresholdSession",
    "he_python",
]
