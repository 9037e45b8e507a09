"""The Ray Serve engine serves encrypted inference end to end: scale from zero, two models on one replica,
and Ray's actors carry ciphertext only (what they receive is recorded and searched for secrets)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from sealedml._internal.procs import ServiceProcess
from tests.conftest import Stack, start_keyservice

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _replicas(gateway: str) -> dict[str, int]:
    stats = httpx.get(f"{gateway}/v1/stats", timeout=30).json()
    return stats["applications"]["sealedml"]["sealedml-runtime"]["replicas"]


def _tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time (empty if ``root`` does not exist)."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")} if root.exists() else {}


def test_ray_engine_scale_from_zero_and_multiplexing(tmp_path: Path, toy_model, monkeypatch):
    home_before = set(Path.home().iterdir()) if Path.home().exists() else set()
    ray_home_before = _tree(Path.home() / ".ray")
    # Short (Ray's socket paths must fit 107 bytes) and unique to this test process (two suites at once).
    ray_dir = Path("/tmp") / f"sr{os.getpid()}"
    ks = start_keyservice(tmp_path)
    (tmp_path / "ray-record").mkdir()
    gw = None
    try:
        gw = ServiceProcess.start(
            [
                "platform",
                "serve",
                "--engine",
                "ray",
                "--keyservice",
                ks.url,
                "--store",
                str(tmp_path / "store"),
                "--port",
                "0",
                "--max-instances",
                "1",
                "--concurrency",
                "2",
                "--keep-alive",
                "30",
                "--ray-cpus",
                "2",
                "--ray-temp-dir",
                str(ray_dir),
                "--ray-record",
                str(tmp_path / "ray-record"),
                "--tls",
                "ra",  # the replica reaches its worker over RA-TLS
            ],
            name="ray-platform",
            log_path=tmp_path / "ray-platform.log",
            timeout=240,
        )
        # The local cluster's auth token lives in its session directory, private to this user.
        token = ray_dir / "auth_token"
        assert token.is_file() and token.stat().st_mode & 0o777 == 0o600
        stack = Stack(tmp_path, ks, gw)
        owner, owner_ks = stack.principal()
        user, user_ks = stack.principal()
        stack.publish(owner_ks, toy_model, "ray-a", users=[(user, user_ks)])
        from sealedml import zoo

        stack.publish(owner_ks, zoo.digits().model, "ray-b", users=[(user, user_ks)])

        assert sum(v for k, v in _replicas(gw.url).items() if "RUNNING" in k) == 0  # scaled to zero
        client = stack.infer_client(user)
        out = client.infer("ray-a", {"x": np.ones((1, 4), np.float32), "idx": np.array([4], np.int64)})
        assert int(out["idx_plus_one"][0]) == 5  # the first request scaled the runtime up from zero
        dm = zoo.digits()
        labels = client.infer("ray-b", dm.x_test[:5])["label"]
        assert list(labels) == list(dm.estimator.predict(dm.x_test[:5]))
        running = {k: v for k, v in _replicas(gw.url).items() if "RUNNING" in k}
        assert sum(running.values()) == 1  # both models multiplexed on the single replica

        # The platform's own gateway app: the same routes, headers and metrics as the local engine.
        assert httpx.get(f"{gw.url}/v1/health", timeout=30).json() == {"status": "ok"}
        metrics = httpx.get(f"{gw.url}/metrics", timeout=30).text
        assert 'sealedml_invocations_total{function="ray-a",outcome="ok"} 1.0' in metrics
        assert 'sealedml_cold_starts_total{function="ray-a"} 1.0' in metrics  # the worker started for it
        assert 'sealedml_cold_starts_total{function="ray-b"}' not in metrics  # served by the same worker
        stats = httpx.get(f"{gw.url}/v1/stats", timeout=30).json()
        assert {f["function"]: f["invocations"] for f in stats["functions"]} == {"ray-a": 1, "ray-b": 1}

        # What the Ray actor carried: every request and answer body, and nothing secret in them.
        recorded = sorted((tmp_path / "ray-record").iterdir())
        assert len([p for p in recorded if p.suffix == ".in"]) == 2 and len(recorded) == 4
        secrets_ = [
            np.ones((1, 4), np.float32).tobytes(),  # the first request's input
            np.ascontiguousarray(dm.x_test[:5]).tobytes()[:64],  # the second request's input
            user.request_key("ray-a"),  # what a lease would carry
            user.request_key("ray-b"),
        ]
        for path in recorded:
            body = path.read_bytes()
            assert not any(secret in body for secret in secrets_), path.name
        for client_ in stack.clients:
            client_.close()  # type: ignore[attr-defined]
    finally:
        if gw is not None:
            gw.stop(grace=60)
        ks.stop()
        import shutil

        shutil.rmtree(ray_dir, ignore_errors=True)
    home_after = set(Path.home().iterdir()) if Path.home().exists() else set()
    assert not {p.name for p in home_after - home_before if p.name.startswith(".ray") or p.name == "ray"}
    assert _tree(Path.home() / ".ray") == ray_home_before  # Ray wrote nothing into the home directory
