"""Tests of memory-bounded execution (sealedml.runtime.streaming)."""
