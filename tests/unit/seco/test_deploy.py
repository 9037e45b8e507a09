"""The owner's deployment files, the message-list framing and SECO mode's commands (no HE engine needed)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest

from sealedml.cli.main import main
from sealedml.errors import ConfigurationError, InputError
from sealedml.seco.deploy import PARTY_DIRS, deploy, load_party
from sealedml.seco.link import LinkError
from sealedml.seco.model import SECO_PRIME, SecoArchitecture, compile_model
from sealedml.seco.wire import pack, unpack, unvec, vec
from sealedml.zoo.digits_mlp import digits_mlp

from .test_model import _model


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    model = compile_model(digits_mlp().model)
    out = tmp_path_factory.mktemp("deploy") / "d"
    deploy(model, out)
    return out, model


def test_each_party_gets_its_own_private_directory(deployment: tuple[Path, object]) -> None:
    out, _ = deployment
    for party, folder in PARTY_DIRS.items():
        files = sorted(p.name for p in (out / folder).iterdir())
        assert files == (
            ["identity.key", "party.json", "share.npz"] if party in "BC" else ["identity.key", "party.json"]
        )
        for path in (out / folder).iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert load_party(out / folder, expect=party).name == party


def test_the_two_shares_add_up_to_the_fixed_point_model_and_the_gateway_has_no_weights(
    deployment: tuple[Path, object],
) -> None:
    out, model = deployment
    b, c = load_party(out / "remote-b", expect="B"), load_party(out / "remote-c", expect="C")
    assert b.weights is not None and c.weights is not None and b.biases is not None and c.biases is not None
    for (w, bias), wb, wc, bb, bc in zip(model.fixed_point(), b.weights, c.weights, b.biases, c.biases, strict=True):  # type: ignore[attr-defined]
        assert np.array_equal((wb + wc) % SECO_PRIME, w) and np.array_equal((bb + bc) % SECO_PRIME, bias)
        assert not np.array_equal(wb, w) and wb.max() > SECO_PRIME // 2
    gateway = json.loads((out / "gateway" / "party.json").read_text())
    assert set(gateway) == {"format", "party", "architecture", "peers"} and set(gateway["peers"]) == {"U", "B", "C"}
    assert load_party(out / "gateway", expect="A").weights is None


def test_parties_know_each_others_public_keys(deployment: tuple[Path, object]) -> None:
    out, _ = deployment
    loaded = {party: load_party(out / folder, expect=party) for party, folder in PARTY_DIRS.items()}
    for party, files in loaded.items():
        for peer, public in files.peers.items():
            assert public == loaded[peer].key.public_bytes, (party, peer)


def test_deploy_never_overwrites(deployment: tuple[Path, object]) -> None:
    out, model = deployment
    with pytest.raises(ConfigurationError, match="not empty"):
        deploy(model, out)  # type: ignore[arg-type]


def test_a_party_directory_of_another_role_or_damaged_is_refused(
    deployment: tuple[Path, object], tmp_path: Path
) -> None:
    out, _ = deployment
    with pytest.raises(ConfigurationError, match="expected A"):
        load_party(out / "remote-b", expect="A")
    with pytest.raises(ConfigurationError, match="not a SECO party directory"):
        load_party(tmp_path, expect="A")
    broken = tmp_path / "b"
    broken.mkdir()
    for name in ("party.json", "identity.key"):
        (broken / name).write_bytes((out / "remote-b" / name).read_bytes())
    np.savez(broken / "share.npz", w0=np.zeros(3))
    with pytest.raises(ConfigurationError, match=r"share\.npz"):
        load_party(broken, expect="BC")
    (broken / "party.json").write_text('{"format": "other"}')
    with pytest.raises(ConfigurationError, match="not a SECO party file"):
        load_party(broken, expect="BC")


def test_the_architecture_round_trips_and_malformed_documents_are_refused() -> None:
    arch = compile_model(digits_mlp().model).architecture
    assert SecoArchitecture.from_json(json.loads(json.dumps(arch.to_json()))) == arch
    assert arch.softmax and arch.relu_widths == [32] and arch.n_outputs == 10
    for doc in (None, [], {"input_name": "x"}, {**arch.to_json(), "layer_shapes": [[10, 63]]}):
        with pytest.raises(InputError):
            SecoArchitecture.from_json(doc)
    with pytest.raises(InputError, match="finite"):
        arch.encode_input(np.full(64, np.nan))


def test_message_lists_round_trip_and_malformed_ones_are_link_errors() -> None:
    items = [b"", b"a", b"x" * 1000]
    assert unpack(pack(items)) == items
    assert unpack(pack(items), expect=3) == items
    data = pack(items)
    for bad in (b"", data[:-1], data + b"!", b"\xff\xff\xff\xff"):
        with pytest.raises(LinkError):
            unpack(bad)
    with pytest.raises(LinkError, match="expected 2"):
        unpack(data, expect=2)
    values = np.array([0, 1, SECO_PRIME - 1])
    assert np.array_equal(unvec(vec(values), 3, SECO_PRIME), values)
    with pytest.raises(LinkError, match="outside the field"):
        unvec(vec(np.array([SECO_PRIME])), 1, SECO_PRIME)
    with pytest.raises(LinkError, match="expected 2 values"):
        unvec(vec(values), 2, SECO_PRIME)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_seco_deploy_command_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trained = digits_mlp()
    onnx.save(trained.model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", trained.x_test[:10])
    code, report = _run(
        capsys,
        "seco",
        "deploy",
        str(tmp_path / "m.onnx"),
        "--out",
        str(tmp_path / "d"),
        "--data",
        str(tmp_path / "x.npy"),
    )
    assert code == 0 and report["layers"] == [[32, 64], [10, 32]] and int(report["peak_fixed_point"]) > 0  # type: ignore[call-overload]
    assert set(report["directories"]) == {"A", "B", "C", "U"}  # type: ignore[arg-type]


def test_seco_deploy_refuses_what_seco_cannot_compute_naming_the_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnx import helper

    nodes = [helper.make_node("MaxPool", ["input"], ["y"], name="pool1", kernel_shape=[2, 2])]
    onnx.save(_model(nodes, [], [1, 4, 4], 4), str(tmp_path / "m.onnx"))
    code, report = _run(capsys, "seco", "deploy", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "d"))
    assert code != 0 and report["error"] == "bad_input" and "pool1" in str(report["message"])
    assert not (tmp_path / "d").exists()  # nothing written
    code, report = _run(capsys, "seco", "deploy", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "d"))
    assert code != 0 and "not found" in str(report["message"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["seco", "serve", "--role", "gateway", "--dir", "x"], "--remote B=URL"),
        (["seco", "serve", "--role", "gateway", "--dir", "x", "--remote", "D=http://h"], "B=URL or C=URL"),
        (["seco", "serve", "--role", "remote", "--dir", "x", "--remote", "B=http://h"], "for the gateway"),
        (["infer", "--gateway", "http://h", "--input", "x.npy"], "needs ID, --identity, --keyservice"),
        (["infer", "--mode", "seco", "--gateway", "http://h", "--input", "x.npy"], "--client"),
        (
            ["infer", "m", "--mode", "seco", "--gateway", "http://h", "--client", "d", "--input", "x.npy"],
            "TEE mode only",
        ),
        (
            ["infer", "m", "--gateway", "http://h", "--identity", "i", "--keyservice", "http://k", "--client", "d"],
            "--mode seco only",
        ),
    ],
)
def test_seco_commands_refuse_bad_flags_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _run(capsys, *argv)
    assert code != 0 and report["error"] == "configuration" and message in str(report["message"])
