"""secureTF's shields for unmodified programs: encrypted volumes (the file shield).

* :mod:`.volume` — a directory of sealed files and a sealed manifest whose root tag a tracker
  holds, so tampering, swapping, truncating and restoring an older volume are all refused.
"""

from sealedml.shield.volume import (
    MemoryTracker,
    RootTracker,
    Volume,
    VolumeError,
    VolumeRollbackError,
    VolumeTamperedError,
)

__all__ = ["MemoryTracker", "RootTracker", "Volume", "VolumeError", "VolumeRollbackError", "VolumeTamperedError"]
