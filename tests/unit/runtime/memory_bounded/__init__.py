"""Tests of memory-bounded execution (sealedml.runtime.memory_bounded)."""
