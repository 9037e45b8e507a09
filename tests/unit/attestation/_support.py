"""Constants of the real attestation vectors in ``../shared/vectors/attestation``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
VECTORS = REPO_ROOT / ".." / "shared" / "vectors" / "attestation"

#: Pinned verification times inside each vector's collateral window (README).
SGX_TIME = datetime(2025, 7, 1, tzinfo=UTC)
TDX_TIME = datetime(2025, 7, 1, tzinfo=UTC)
TDX_OUTDATED_TIME = datetime(2026, 3, 1, tzinfo=UTC)
SNP_TIME = datetime(2025, 7, 1, tzinfo=UTC)

MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
SNP_MEASUREMENT = "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"
