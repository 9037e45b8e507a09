"""Optional dependencies: imported where used, with one line saying which extra installs them.

Serving needs none of them, so a runtime image (and a Gramine enclave's trusted files)
carries no scikit-learn, SciPy or matplotlib: ``pip install sealedml`` installs the
KeyService, platform and runtime; ``sealedml[demo]`` adds the trained zoo models, the
demo and the benchmarks' plots; ``sealedml[assess]`` the leakage assessment.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from sealedml.errors import ConfigurationError

__all__ = ["require"]


def require(module: str, extra: str, what: str) -> ModuleType:
    """``module``, imported.

    Raises:
        ConfigurationError: it is not installed (the message names ``what`` needs it and the extra).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise ConfigurationError(f"{what} needs {package}: pip install 'sealedml[{extra}]'") from exc
