"""The request-size limit: one setting the gateway, its instances and the client agree on.

``platform serve --max-request SIZE`` sets it for the gateway and every instance it starts
(``worker serve --max-request``); clients check it before uploading (``infer --max-request``
or ``SEALEDML_MAX_REQUEST``), so an 80 MB request is refused in a line that says which
limit and how to raise it, not after its upload.
"""

from __future__ import annotations

import os

from sealedml._internal.units import format_bytes, parse_size

__all__ = ["DEFAULT_MAX_REQUEST", "ENVIRONMENT", "max_request", "too_large"]

#: The default limit of a request body (the sealed envelope), in bytes.
DEFAULT_MAX_REQUEST = 64 * 2**20
#: The environment variable that sets it wherever no flag does.
ENVIRONMENT = "SEALEDML_MAX_REQUEST"


def max_request(flag: str | None = None) -> int:
    """The limit: ``flag`` (a size such as ``128MB``), else ``$SEALEDML_MAX_REQUEST``, else 64 MiB.

    Raises:
        ConfigurationError: a size that does not parse.
    """
    text = flag or os.environ.get(ENVIRONMENT)
    return parse_size(text) if text else DEFAULT_MAX_REQUEST


def too_large(size: int | None, limit: int, where: str, flag: str) -> str:
    """The one-line refusal of a request of ``size`` bytes (None: unknown) above ``limit``."""
    what = f"a request of {format_bytes(size)}" if size is not None else "the request"
    return (
        f"{what} is above {where} limit of {format_bytes(limit)}: raise it with `{flag} SIZE` "
        f"(or {ENVIRONMENT}) on the gateway, its instances and the client alike"
    )
