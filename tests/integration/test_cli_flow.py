"""The README's manual multi-process flow, command by command, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sealedml._internal.procs import ServiceProcess

pytestmark = pytest.mark.slow


def sealedml(*args: str, cwd, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "sealedml", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sealedml {' '.join(args)} failed: {proc.stdout} {proc.stderr}")
    return proc


def js(proc: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(proc.stdout)


def test_readme_manual_flow(tmp_path):
    w = tmp_path
    with (
        ServiceProcess.start(
            ["keyservice", "serve", "--data-dir", str(w / "ks-data"), "--port", "0"],
            name="keyservice",
            log_path=w / "ks.log",
        ) as ks,
        ServiceProcess.start(
            ["platform", "serve", "--keyservice", ks.url, "--store", str(w / "store"), "--port", "0"],
            name="platform",
            log_path=w / "gw.log",
        ) as gw,
    ):
        owner = js(sealedml("identity", "new", "--out", "owner.json", "--json", cwd=w))
        user = js(sealedml("identity", "new", "--out", "user.json", "--json", cwd=w))
        for ident in ("owner.json", "user.json"):
            reg = js(sealedml("register", "--keyservice", ks.url, "--identity", ident, "--json", cwd=w))
            assert reg["principal_id"] in (owner["principal_id"], user["principal_id"])
        sealedml(
            "zoo", "export", "digits", "--out", "digits.onnx", "--test-data", "digits-x.npy", "--samples", "5", cwd=w
        )
        sealed = js(
            sealedml(
                "model",
                "seal",
                "digits.onnx",
                "--model-id",
                "digits",
                "--identity",
                "owner.json",
                "--keyservice",
                ks.url,
                "--store",
                "store",
                "--json",
                cwd=w,
            )
        )
        assert sealed["version"] == 1
        measurement = sealedml("measurement", cwd=w).stdout.strip()
        assert len(measurement) == 96
        sealedml(
            "model",
            "allow-runtime",
            "digits",
            "--measurement",
            measurement,
            "--identity",
            "owner.json",
            "--keyservice",
            ks.url,
            cwd=w,
        )
        sealedml(
            "model",
            "grant",
            "digits",
            "--user",
            user["principal_id"],
            "--identity",
            "owner.json",
            "--keyservice",
            ks.url,
            cwd=w,
        )
        # infer before enable: a clear, actionable error
        early = sealedml(
            "infer",
            "digits",
            "--input",
            "digits-x.npy",
            "--identity",
            "user.json",
            "--keyservice",
            ks.url,
            "--gateway",
            gw.url,
            cwd=w,
            check=False,
        )
        assert early.returncode != 0 and "model enable" in early.stderr
        sealedml("model", "enable", "digits", "--identity", "user.json", "--keyservice", ks.url, cwd=w)
        result = js(
            sealedml(
                "infer",
                "digits",
                "--input",
                "digits-x.npy",
                "--identity",
                "user.json",
                "--keyservice",
                ks.url,
                "--gateway",
                gw.url,
                "--out",
                "pred.npz",
                "--json",
                cwd=w,
            )
        )
        assert set(result["outputs"]) == {"label", "probabilities"}
        # The first request loaded lease and model; the gateway's wait and the instance's phases are reported.
        assert {"platform-queue", "release", "decrypt", "open", "compute", "seal"} <= set(result["phases_ms"])
        assert all(ms >= 0 for ms in result["phases_ms"].values()) and "peak_bytes" not in result
        saved = np.load(w / "pred.npz")
        from sealedml import zoo

        assert list(saved["label"]) == list(zoo.digits().estimator.predict(zoo.digits().x_test[:5]))
        # revoke: the command works and reports it
        rev = js(
            sealedml(
                "model",
                "revoke",
                "digits",
                "--user",
                user["principal_id"],
                "--identity",
                "owner.json",
                "--keyservice",
                ks.url,
                "--json",
                cwd=w,
            )
        )
        assert rev["granted"] is False


def test_errors_are_one_line_and_nonzero(tmp_path):
    missing = sealedml(
        "register", "--keyservice", "http://127.0.0.1:9", "--identity", "nope.json", cwd=tmp_path, check=False
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "nope.json" in missing.stderr
    as_json = sealedml(
        "register", "--keyservice", "http://127.0.0.1:9", "--identity", "nope.json", "--json", cwd=tmp_path, check=False
    )
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["error"] == "configuration"
    sealedml("identity", "new", "--out", "a.json", cwd=tmp_path)
    again = sealedml("identity", "new", "--out", "a.json", cwd=tmp_path, check=False)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    down = sealedml("register", "--keyservice", "http://127.0.0.1:9", "--identity", "a.json", cwd=tmp_path, check=False)
    assert down.returncode == 6 and "unreachable" in down.stderr and "127.0.0.1:9" in down.stderr


def test_demo_json(tmp_path):
    proc = sealedml("demo", "--json", "--samples", "60", cwd=tmp_path)
    result = json.loads(proc.stdout)
    for key in (
        "accuracy",
        "plaintext_accuracy",
        "n",
        "cold_start_ms",
        "warm_p50_ms",
        "denied_unauthorized",
        "denied_after_revoke",
        "tampered_model_rejected",
    ):
        assert key in result
    assert result["accuracy"] == result["plaintext_accuracy"] and result["n"] == 60
    assert result["denied_unauthorized"] and result["denied_after_revoke"] and result["tampered_model_rejected"]


def test_demo_memory_budget_keeps_accuracy(tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    proc = sealedml(
        "demo", "--json", "--samples", "60", "--memory-budget", "2MB", "--spill-dir", str(spill), cwd=tmp_path
    )
    result = json.loads(proc.stdout)
    assert result["ok"] and result["n"] == 60
    assert result["accuracy"] == result["plaintext_accuracy"]
    assert result["memory_budget"] == "2MB" and result["spill_dir"] == str(spill.resolve())
    assert 0 < result["peak_tracked_bytes"] <= 2_000_000
    assert list(spill.iterdir()) == []  # the spill file never has a name


def test_spill_dir_is_checked_before_anything_starts(tmp_path):
    no_budget = sealedml("demo", "--spill-dir", str(tmp_path), cwd=tmp_path, check=False)
    assert no_budget.returncode == 1 and "--spill-dir needs --memory-budget" in no_budget.stderr
    no_budget = sealedml("demo", "--no-warm-first-segment", cwd=tmp_path, check=False)
    assert no_budget.returncode == 1 and "--no-warm-first-segment needs --memory-budget" in no_budget.stderr
    missing = sealedml(
        "worker", "serve", "--keyservice", "http://127.0.0.1:9", "--store", str(tmp_path / "store"),
        "--memory-budget", "2MB", "--spill-dir", str(tmp_path / "nope"),
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert missing.returncode == 1 and "not a directory" in missing.stderr


TDX_COLLATERAL = "../shared/vectors/attestation/tdx/collateral-v4.json"


def test_keyservice_mixing_simulated_and_tdx_refuses_to_start_without_opt_in(tmp_path):
    """``--accept simulated,tdx`` needs ``--unsafe-allow-simulated``; with it, simulated evidence never
    satisfies a measurement allowed for TDX."""
    import asyncio
    import sqlite3
    from pathlib import Path

    from sealedml.attestation.simulated import SimulatedAttester
    from sealedml.client.identity import Identity
    from sealedml.client.keyservice import KeyServiceClient
    from sealedml.errors import AccessDenied
    from sealedml.runtime.release import ReleaseClient

    collateral = str((Path(__file__).resolve().parents[2] / TDX_COLLATERAL).resolve())
    args = ["keyservice", "serve", "--data-dir", str(tmp_path / "ks"), "--port", "0"]
    args += ["--accept", "simulated,tdx", "--collateral", collateral]
    refused = sealedml(*args, "--json", cwd=tmp_path, check=False)
    assert refused.returncode == 1
    assert js(refused)["error"] == "configuration" and "--unsafe-allow-simulated" in js(refused)["message"]
    assert not (tmp_path / "ks").exists()  # refused before touching any state

    runtime = SimulatedAttester(role="runtime")
    with ServiceProcess.start([*args, "--unsafe-allow-simulated"], name="ks", log_path=tmp_path / "ks.log") as ks:
        assert "UNSAFE" in (tmp_path / "ks.log").read_text()
        owner, user = Identity.generate(), Identity.generate()
        with KeyServiceClient(ks.url, owner) as o, KeyServiceClient(ks.url, user) as u:
            assert o.attest().unsafe_allow_simulated and o.attest().accepts == ("simulated", "tdx")
            o.register()
            u.register()
            o.upload_model_key("m", 1, os.urandom(32))
            # The simulated runtime's measurement, allowed and consented to — for TDX only.
            o.allow_runtime("m", runtime.measurement, tee="tdx")
            o.grant("m", user.principal_id)
            u.enable("m", [f"tdx:{runtime.measurement}"])

        async def release() -> None:
            client = ReleaseClient(ks.url, runtime)
            try:
                await client.release([("m", user.principal_id)])
            finally:
                await client.aclose()

        with pytest.raises(AccessDenied):
            asyncio.run(release())
    db = sqlite3.connect(f"file:{tmp_path / 'ks' / 'keyservice.sqlite3'}?mode=ro", uri=True)
    events = [json.loads(r[0]) for r in db.execute("SELECT event FROM audit ORDER BY seq")]
    db.close()
    last = [e for e in events if e.get("action") == "release"][-1]
    assert last["decision"] == "deny" and last["tee"] == "simulated"
    assert f"owner does not allow runtime simulated:{runtime.measurement}" in last["reason"]


def test_a_forgotten_allow_runtime_is_explained_to_the_user_and_the_owner_but_not_to_a_stranger(tmp_path):
    """The README's manual flow with the owner forgetting `model allow-runtime`."""
    w = tmp_path
    with (
        ServiceProcess.start(
            ["keyservice", "serve", "--data-dir", str(w / "ks-data"), "--port", "0"],
            name="keyservice",
            log_path=w / "ks.log",
        ) as ks,
        ServiceProcess.start(
            ["platform", "serve", "--keyservice", ks.url, "--store", str(w / "store"), "--port", "0"],
            name="platform",
            log_path=w / "gw.log",
        ) as gw,
    ):
        ids = {}
        for who in ("owner", "user", "stranger"):
            ids[who] = js(sealedml("identity", "new", "--out", f"{who}.json", "--json", cwd=w))["principal_id"]
            sealedml("register", "--keyservice", ks.url, "--identity", f"{who}.json", cwd=w)
        ks_flags = ("--keyservice", ks.url)
        sealedml("zoo", "export", "digits", "--out", "d.onnx", "--test-data", "x.npy", "--samples", "2", cwd=w)
        sealedml(
            "model",
            "seal",
            "d.onnx",
            "--model-id",
            "digits",
            "--identity",
            "owner.json",
            *ks_flags,
            "--store",
            "store",
            cwd=w,
        )
        # a typo in the user id is refused, not granted silently
        typo = sealedml(
            "model", "grant", "digits", "--user", "0" * 64, "--identity", "owner.json", *ks_flags, cwd=w, check=False
        )
        assert typo.returncode != 0 and "register" in typo.stderr
        sealedml("model", "grant", "digits", "--user", ids["user"], "--identity", "owner.json", *ks_flags, cwd=w)
        sealedml("model", "enable", "digits", "--identity", "user.json", *ks_flags, cwd=w)  # owner forgot allow-runtime

        def infer(who: str, *extra: str) -> subprocess.CompletedProcess[str]:
            return sealedml(
                "infer", "digits", "--input", "x.npy", "--identity", f"{who}.json", *ks_flags, "--gateway", gw.url, *extra,
                cwd=w, check=False,
            )  # fmt: skip

        checked = infer("user")
        assert checked.returncode != 0 and "no_runtime_allowed" in checked.stderr and "allow-runtime" in checked.stderr
        sent = infer("user", "--skip-check")  # the request reaches a runtime, whose release is denied
        assert sent.returncode != 0 and "no_runtime_allowed" in sent.stderr
        info = js(sealedml("model", "info", "digits", "--identity", "user.json", *ks_flags, "--json", cwd=w))
        assert info["access"] == "no_runtime_allowed" and info["grants"] is None and info["consents"] is None

        audit = js(sealedml("model", "audit", "digits", "--identity", "owner.json", *ks_flags, "--json", cwd=w))
        denials = [r for r in audit["records"] if r["action"] == "release" and r["decision"] == "deny"]
        assert denials and denials[-1]["reason"] == f"digits/{ids['user']}: owner allows no runtime measurement"
        assert denials[-1]["pairs"] == [["digits", ids["user"]]]
        owner_info = js(sealedml("model", "info", "digits", "--identity", "owner.json", *ks_flags, "--json", cwd=w))
        assert owner_info["grants"] == [ids["user"]] and owner_info["allowed_runtimes"] == []
        assert [c["user_id"] for c in owner_info["consents"]] == [ids["user"]]

        # a stranger learns nothing more than "denied", whatever they ask
        stranger = infer("stranger", "--skip-check")
        assert stranger.returncode != 0 and "no_runtime_allowed" not in stranger.stderr and "denied" in stranger.stderr
        for command in (("model", "info", "digits"), ("model", "audit", "digits")):
            refused = sealedml(*command, "--identity", "stranger.json", *ks_flags, "--json", cwd=w, check=False)
            assert refused.returncode != 0 and json.loads(refused.stdout) == {"error": "denied", "message": "denied"}
        user_audit = sealedml(
            "model", "audit", "digits", "--identity", "user.json", *ks_flags, "--json", cwd=w, check=False
        )
        assert json.loads(user_audit.stdout)["error"] == "denied"


def test_model_seal_refuses_what_cannot_run_before_uploading_anything(tmp_path):
    """An empty file and a non-ONNX file fail before any upload; a good model's inputs and outputs show in
    `model info`."""
    w = tmp_path
    with ServiceProcess.start(
        ["keyservice", "serve", "--data-dir", str(w / "ks-data"), "--port", "0"],
        name="keyservice",
        log_path=w / "ks.log",
    ) as ks:
        sealedml("identity", "new", "--out", "owner.json", cwd=w)
        sealedml("register", "--keyservice", ks.url, "--identity", "owner.json", cwd=w)
        (w / "empty.onnx").write_bytes(b"")
        (w / "notes.onnx").write_text("these are not the weights you are looking for\n")
        for name, message in (("empty.onnx", "is empty"), ("notes.onnx", "ONNX Runtime cannot load it")):
            refused = sealedml(
                "model", "seal", name, "--model-id", "m", "--identity", "owner.json", "--keyservice", ks.url,
                "--store", "store", cwd=w, check=False,
            )  # fmt: skip
            assert refused.returncode != 0 and message in refused.stderr and "nothing was sealed" in refused.stderr
            assert refused.stderr.strip().count("\n") == 0
        assert not (w / "store" / "m").exists()
        unknown = sealedml(
            "model", "info", "m", "--identity", "owner.json", "--keyservice", ks.url, "--json", cwd=w, check=False
        )
        assert json.loads(unknown.stdout)["error"] == "denied"  # no key was uploaded: the model does not exist
        sealedml("zoo", "export", "digits", "--out", "d.onnx", cwd=w)
        sealed = sealedml(
            "model",
            "seal",
            "d.onnx",
            "--model-id",
            "m",
            "--identity",
            "owner.json",
            "--keyservice",
            ks.url,
            "--store",
            "store",
            cwd=w,
        )
        assert "sealing d.onnx: 100% of" in sealed.stderr  # progress, on stderr
        info = js(sealedml("model", "info", "m", "--identity", "owner.json", "--keyservice", ks.url, "--json", cwd=w))
        assert info["inputs"] == [{"name": "input", "dtype": "float32", "shape": [None, 64]}]
        assert {o["name"] for o in info["outputs"]} == {"label", "probabilities"}

        flags = ("--identity", "owner.json", "--keyservice", ks.url)
        listed = js(sealedml("model", "list", *flags, "--json", cwd=w))
        assert listed == {"models": [{"model_id": "m", "current_version": 1, "partitioned": False}]}
        unconfirmed = sealedml("model", "delete", "m", *flags, "--store", "store", cwd=w, check=False)
        assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stderr and (w / "store" / "m").exists()
        deleted = js(sealedml("model", "delete", "m", *flags, "--store", "store", "--yes", "--json", cwd=w))
        assert deleted == {"model_id": "m", "deleted": True, "store_files_removed": 1}
        assert not (w / "store" / "m").exists()
        assert js(sealedml("model", "list", *flags, "--json", cwd=w)) == {"models": []}
