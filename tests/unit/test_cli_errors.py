"""Errors a user meets at the command line: one line, what happened, what to do, and a distinct exit code."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from sealedml._internal.http import check_url
from sealedml.cli._common import EXIT_CODES, exit_code_for
from sealedml.cli.main import main
from sealedml.errors import (
    AccessDenied,
    AuthenticationError,
    ConfigurationError,
    EnvelopeError,
    InputError,
    NotFound,
    Overloaded,
    PolicyError,
    SealedModelError,
    ServiceUnavailable,
)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (AccessDenied(), "denied"),
        (AuthenticationError("unknown principal"), "denied"),
        (NotFound("no such model"), "not_found"),
        (InputError("bad shape"), "bad_input"),
        (EnvelopeError("bad envelope"), "bad_input"),
        (SealedModelError("tampered"), "error"),
        (ServiceUnavailable("down"), "unavailable"),
        (Overloaded(), "unavailable"),
        (ConfigurationError("bad flag"), "error"),
        (PolicyError("tcb"), "error"),
    ],
)
def test_each_kind_of_error_has_its_exit_code(error, kind):
    assert exit_code_for(error) == EXIT_CODES[kind]
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)


@pytest.mark.parametrize("url", ["localhost:8000", "127.0.0.1:8000", "ftp://host", "http://", "keyservice"])
def test_urls_without_a_scheme_or_host_are_refused_by_name(url):
    with pytest.raises(ConfigurationError, match=r"--keyservice.*http:// or https://"):
        check_url(url, "the KeyService URL (--keyservice)")
    assert check_url("http://127.0.0.1:8000/", "x") == "http://127.0.0.1:8000"


def test_the_cli_names_a_bad_url_and_a_bad_measurement_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["identity", "new", "--out", "a.json"]) == 0
    capsys.readouterr()
    assert main(["register", "--keyservice", "localhost:8000", "--identity", "a.json"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "http:// or https://" in err and "localhost:8000" in err
    code = main(
        ["register", "--keyservice", "http://127.0.0.1:9", "--identity", "a.json", "--keyservice-measurement", "xyz"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "64 or 96 hex digits" in err and "sealedml measurement --role keyservice" in err


@pytest.fixture
def not_a_keyservice() -> Iterator[str]:
    """A real HTTP server on loopback that is not a SealedML service (404 everywhere, HTML body)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_url_of_another_service_says_so(not_a_keyservice, tmp_path, capsys, monkeypatch):
    from sealedml.attestation.simulated import SimulatedPlatform

    SimulatedPlatform.load(create=True)  # this test's own simulated platform root (SEALEDML_HOME is per test)
    monkeypatch.chdir(tmp_path)
    assert main(["identity", "new", "--out", "a.json"]) == 0
    capsys.readouterr()
    code = main(["register", "--keyservice", not_a_keyservice, "--identity", "a.json"])
    err = capsys.readouterr().err
    assert code == EXIT_CODES["not_found"]
    assert f"the KeyService at {not_a_keyservice} has no such endpoint (HTTP 404)" in err and "right service" in err


def test_an_onnx_runtime_shape_error_keeps_its_detail():
    from sealedml.runtime.engine import ort_failure

    error = RuntimeError(
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: input for the following "
        "indices\n index: 2 Got: 32 Expected: 28\n Please fix either the inputs/outputs or the model."
    )
    text = ort_failure(error)
    assert "index: 2 Got: 32 Expected: 28" in text and "\n" not in text


def test_an_invalid_model_id_is_named_before_any_request(tmp_path, capsys, monkeypatch):
    from sealedml.attestation.simulated import SimulatedPlatform

    SimulatedPlatform.load(create=True)
    monkeypatch.chdir(tmp_path)
    assert main(["identity", "new", "--out", "a.json"]) == 0
    capsys.readouterr()
    code = main(["model", "info", "team/model", "--identity", "a.json", "--keyservice", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == EXIT_CODES["bad_input"] and "model id 'team/model' is not valid" in err


# ---------------------------------------------------------------------------- configuration


def test_client_options_come_from_the_environment_then_a_config_file_and_flags_win(tmp_path, capsys, monkeypatch):
    from sealedml.attestation.simulated import SimulatedPlatform

    SimulatedPlatform.load(create=True)
    monkeypatch.chdir(tmp_path)
    for variable in ("SEALEDML_KEYSERVICE", "SEALEDML_IDENTITY", "SEALEDML_GATEWAY", "SEALEDML_CONFIG"):
        monkeypatch.delenv(variable, raising=False)
    assert main(["identity", "new", "--out", "a.json"]) == 0
    capsys.readouterr()

    assert main(["model", "info", "m"]) == 1
    assert "give --identity or set SEALEDML_IDENTITY" in capsys.readouterr().err

    monkeypatch.setenv("SEALEDML_IDENTITY", "a.json")
    monkeypatch.setenv("SEALEDML_KEYSERVICE", "http://127.0.0.1:9")
    assert main(["model", "info", "m"]) == EXIT_CODES["unavailable"]
    assert "KeyService at http://127.0.0.1:9 unreachable" in capsys.readouterr().err

    assert main(["model", "info", "m", "--keyservice", "http://127.0.0.1:10"]) == EXIT_CODES["unavailable"]
    assert "http://127.0.0.1:10 unreachable" in capsys.readouterr().err  # the flag overrides the variable

    monkeypatch.delenv("SEALEDML_KEYSERVICE")
    (tmp_path / "sealedml.toml").write_text('keyservice = "http://127.0.0.1:11"\n')
    monkeypatch.setenv("SEALEDML_CONFIG", str(tmp_path / "sealedml.toml"))
    assert main(["model", "info", "m"]) == EXIT_CODES["unavailable"]
    assert "http://127.0.0.1:11 unreachable" in capsys.readouterr().err  # from the config file

    (tmp_path / "sealedml.toml").write_text('keyservce = "typo"\n')
    assert main(["model", "info", "m"]) == 1
    assert "unknown keys keyservce" in capsys.readouterr().err


def test_infer_takes_its_gateway_from_the_environment(tmp_path, capsys, monkeypatch):
    from sealedml.attestation.simulated import SimulatedPlatform

    SimulatedPlatform.load(create=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEALEDML_CONFIG", raising=False)
    assert main(["identity", "new", "--out", "a.json"]) == 0
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    capsys.readouterr()
    monkeypatch.delenv("SEALEDML_GATEWAY", raising=False)
    assert main(["infer", "m", "--input", "x.npy", "--identity", "a.json", "--keyservice", "http://127.0.0.1:9"]) == 1
    assert "give --gateway or set SEALEDML_GATEWAY" in capsys.readouterr().err
    monkeypatch.setenv("SEALEDML_GATEWAY", "http://127.0.0.1:12")
    monkeypatch.setenv("SEALEDML_KEYSERVICE", "http://127.0.0.1:9")
    code = main(["infer", "m", "--input", "x.npy", "--identity", "a.json", "--skip-check"])
    assert code == EXIT_CODES["unavailable"] and "gateway at http://127.0.0.1:12 unreachable" in capsys.readouterr().err
