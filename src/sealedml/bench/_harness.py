"""Shared benchmark plumbing: an isolated stack of real processes, medians, ratios."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from sealedml._internal.procs import ServiceProcess

__all__ = ["BenchStack", "bench_stack", "isolated_home", "median_ms", "progress"]


def progress(msg: str, quiet: bool) -> None:
    """A progress line on stderr (stdout stays clean for ``--json``)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


@dataclass
class BenchStack:
    workdir: Path
    keyservice: ServiceProcess
    gateway: ServiceProcess

    @property
    def store(self) -> Path:
        return self.workdir / "store"


@contextmanager
def isolated_home() -> Iterator[Path]:
    """A temporary working directory whose ``home/`` is ``SEALEDML_HOME`` while the block runs.

    Benchmarks get their own simulated platform root and never touch the user's.
    """
    with tempfile.TemporaryDirectory(prefix="sealedml-bench-") as directory:
        workdir = Path(directory)
        old = os.environ.get("SEALEDML_HOME")
        os.environ["SEALEDML_HOME"] = str(workdir / "home")
        try:
            yield workdir
        finally:
            if old is None:
                os.environ.pop("SEALEDML_HOME", None)
            else:
                os.environ["SEALEDML_HOME"] = old


@contextmanager
def bench_stack(platform_args: list[str], *, lease_ttl: int = 600) -> Iterator[BenchStack]:
    """KeyService + gateway in a temporary directory with its own SEALEDML_HOME."""
    with ExitStack() as stack:
        workdir = stack.enter_context(isolated_home())
        ks = stack.enter_context(
            ServiceProcess.keyservice(
                workdir / "ks", "--lease-ttl", str(lease_ttl), log_path=workdir / "keyservice.log"
            )
        )
        gw = stack.enter_context(
            ServiceProcess.platform(ks.url, workdir / "store", *platform_args, log_path=workdir / "platform.log")
        )
        yield BenchStack(workdir, ks, gw)


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")
