"""secureTF's shields for unmodified programs: encrypted volumes and mutual-TLS forwarding.

* :mod:`.volume` — a directory of sealed files and a sealed manifest whose root tag a tracker
  holds, so tampering, swapping, truncating and restoring an older volume are all refused.
* :mod:`.network` — forwarders that carry a program's plain TCP over mutual TLS between
  services of one session, with certificates of the session's own CA.
"""

from sealedml.shield.network import Forwarder, PeerRefusedError, TlsIdentity
from sealedml.shield.volume import (
    MemoryTracker,
    RootTracker,
    Volume,
    VolumeError,
    VolumeRollbackError,
    VolumeTamperedError,
)

__all__ = [
    "Forwarder",
    "MemoryTracker",
    "PeerRefusedError",
    "RootTracker",
    "TlsIdentity",
    "Volume",
    "VolumeError",
    "VolumeRollbackError",
    "VolumeTamperedError",
]
