"""Untrusted storage plug-ins: where sealed models live."""

from __future__ import annotations

from sealedml.storage.modelstore import LocalModelStore, ModelStore

__all__ = ["LocalModelStore", "ModelStore"]
