"""Keys and names the envelope and container tests share (unit and security alike).

Fixed values, so a failure reproduces byte for byte; no test should depend on
which value each one has, only on ``MODEL_KEY`` and ``OTHER_MODEL_KEY`` (and the
two request keys) being different.
"""

from __future__ import annotations

MODEL_KEY = bytes(range(32))
OTHER_MODEL_KEY = bytes(range(32, 64))
REQUEST_KEY = bytes(range(100, 132))
OTHER_REQUEST_KEY = bytes(range(101, 133))
#: A fixed "now" for request timestamps (2023-11-14).
NOW = 1_700_000_000
MODEL = "digits"
USER = "alice"
