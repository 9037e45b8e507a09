"""Every line the services log is a JSON object (a log shipper can parse it), uvicorn's included, and the
simulated-TEE warning appears once per process, not once per attestation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sealedml import zoo
from tests.conftest import _make_stack

pytestmark = pytest.mark.slow


def test_every_line_a_service_logs_is_json(tmp_path_factory, unique_id, monkeypatch):
    monkeypatch.setenv("SEALEDML_LOG_LEVEL", "INFO")  # the services and the instances they start
    workdir = tmp_path_factory.mktemp("logs")
    for stack in _make_stack(workdir):
        owner, owner_ks = stack.principal()
        user, user_ks = stack.principal()
        model_id = unique_id("logs")
        stack.publish(owner_ks, zoo.toy_multi_io(), model_id, users=[(user, user_ks)])
        client = stack.infer_client(user)
        for _ in range(3):
            client.infer(model_id, {"x": np.ones((1, 4), np.float32), "idx": np.zeros(1, np.int64)})
        stranger, _ = stack.principal()
        with pytest.raises(Exception):  # noqa: B017 (any denial: it must be logged as JSON too)
            stack.infer_client(stranger).infer(
                model_id, {"x": np.ones((1, 4), np.float32), "idx": np.zeros(1, np.int64)}
            )
    for name in ("keyservice.log", "platform.log"):
        lines = [line for line in (workdir / name).read_text().splitlines() if line.strip()]
        assert lines, f"{name} is empty"
        records = [json.loads(line) for line in lines]  # raises on the first line that is not JSON
        assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records), name
        simulated = [r for r in records if "SIMULATED TEE" in r["msg"]]
        assert 1 <= len(simulated) <= len({r.get("pid") for r in records}), f"{name}: {len(simulated)} warnings"


def test_uvicorn_and_multi_line_messages_become_single_json_lines(capsys):
    """uvicorn installs no handler of its own, and a message with quotes, newlines and a traceback stays
    one parseable line."""
    import logging

    from sealedml._internal.serve import JsonLogFormatter, _config, configure_logging

    assert _config(object(), "info", {}).log_config is None
    formatter = JsonLogFormatter()
    try:
        raise ValueError('bad "value"\nsecond line')
    except ValueError:
        import sys

        record = logging.LogRecord(
            "uvicorn.error", logging.ERROR, __file__, 1, 'failed: "%s"', ("x\ny",), sys.exc_info()
        )
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == 'failed: "x\ny"' and "second line" in entry["exc"] and entry["logger"] == "uvicorn.error"
    configure_logging("INFO")
