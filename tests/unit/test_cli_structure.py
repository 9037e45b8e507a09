"""The shape of the ``sealedml`` command line: which commands exist, and what every one of them offers.

Nothing here runs a command: ``--help`` exits before the handler, and ``bench release`` is
checked through its pure option reader and a stand-in benchmark module.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from sealedml.cli.bench import release_options
from sealedml.cli.main import build_parser, main
from sealedml.errors import ConfigurationError

#: Every leaf command, as of the split of cli/commands.py (issue 13) plus ``bench release``.
#: Removing or renaming one breaks scripts and docs: change this list only on purpose.
COMMANDS = {
    "demo",
    "up",
    "keyservice serve",
    "keyservice audit-head",
    "platform serve",
    "worker serve",
    "identity new",
    "register",
    "model convert",
    "model seal",
    "model allow-runtime",
    "model grant",
    "model revoke",
    "model enable",
    "model info",
    "model audit",
    "model list",
    "model delete",
    "infer",
    "measurement",
    "zoo export",
    "executor serve",
    "bench partition",
    "bench blind",
    "bench seco",
    "seco deploy",
    "seco serve",
    "partition cuts",
    "partition split",
    "partition assess",
    "bench overhead",
    "bench coldstart",
    "bench concurrency",
    "bench memory",
    "bench trace",
    "bench release",
    "attest verify",
    "attest policy check",
    "identity recovery-key",
    "keyservice recover",
    "keyservice recovery-share",
    "session digest",
    "session sign",
    "session put",
    "session secret",
    "session show",
    "run",
}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every parser below ``parser`` (groups and commands) by its command path."""
    found: dict[tuple[str, ...], Any] = {}
    for name, child in _subcommands(parser).items():
        found[(*path, name)] = child
        found.update(_walk(child, (*path, name)))
    return found


PARSERS = _walk(build_parser())
LEAVES = {path: p for path, p in PARSERS.items() if not _subcommands(p)}


def test_the_commands_are_exactly_the_documented_ones() -> None:
    assert {" ".join(path) for path in LEAVES} == COMMANDS


@pytest.mark.parametrize("path", sorted(PARSERS), ids=" ".join)
def test_every_command_and_group_has_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sealedml {' '.join(path)}")


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_every_command_has_json_and_a_handler(path: tuple[str, ...]) -> None:
    parser = LEAVES[path]
    options = {opt for action in parser._actions for opt in action.option_strings}
    assert "--json" in options
    assert callable(parser.get_default("func"))


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_every_command_lists_json_in_its_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([*path, "--help"])
    assert "--json" in capsys.readouterr().out


def test_top_level_help_keeps_the_command_order() -> None:
    assert list(_subcommands(build_parser())) == [
        "demo",
        "up",
        "keyservice",
        "platform",
        "worker",
        "executor",
        "identity",
        "register",
        "model",
        "infer",
        "measurement",
        "zoo",
        "partition",
        "seco",
        "bench",
        "attest",
        "session",
        "run",
    ]


def test_keyservice_group_spans_modules_once() -> None:
    """``keyservice serve`` (cli/serve.py) and ``keyservice audit-head`` (cli/audit.py) share one group."""
    assert list(_subcommands(PARSERS[("keyservice",)])) == ["serve", "audit-head", "recover", "recovery-share"]


# --------------------------------------------------------------------------- bench release
def _release_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", "release", *argv])


def test_bench_release_defaults() -> None:
    args = _release_args()
    assert (args.concurrency, args.kem, args.duration, args.json) == (8, "both", 10.0, False)
    assert release_options(args) == (8, ("x25519", "hybrid"), 10.0)


@pytest.mark.parametrize(
    ("kem", "kems"), [("x25519", ("x25519",)), ("hybrid", ("hybrid",)), ("both", ("x25519", "hybrid"))]
)
def test_bench_release_kem_choices(kem: str, kems: tuple[str, ...]) -> None:
    assert release_options(_release_args("--kem", kem, "--concurrency", "1", "--duration", "0.5")) == (1, kems, 0.5)


def test_bench_release_refuses_an_unknown_kem(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _release_args("--kem", "mlkem")
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--concurrency", "0"], "--concurrency"),
        (["--concurrency", "-3"], "--concurrency"),
        (["--duration", "0"], "--duration"),
        (["--duration", "-1.5"], "--duration"),
        (["--duration", "nan"], "--duration"),
        (["--duration", "inf"], "--duration"),
    ],
)
def test_bench_release_rejects_bad_flags(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigurationError) as exc_info:
        release_options(_release_args(*argv))
    message = exc_info.value.message
    assert flag in message and "\n" not in message


def test_bench_release_passes_the_flags_to_run_release(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The handler's wiring, against a stand-in for sealedml.bench.release (nothing is benchmarked)."""
    calls: list[dict[str, Any]] = []

    def run_release(**kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return {"concurrency": kwargs["concurrency"]}

    monkeypatch.setitem(sys.modules, "sealedml.bench.release", types.SimpleNamespace(run_release=run_release))
    assert main(["bench", "release", "--kem", "hybrid", "--concurrency", "3", "--duration", "2", "--json"]) == 0
    assert calls == [
        {"concurrency": 3, "kems": ("hybrid",), "duration": 2.0, "quiet": True, "replicas": 1, "kill": False}
    ]
    assert capsys.readouterr().out.strip() == '{"concurrency": 3}'
    assert main(["bench", "release", "--replicas", "2", "--kill", "--json"]) == 0
    assert calls[-1]["replicas"] == 2 and calls[-1]["kill"] is True
    assert main(["bench", "release", "--kill"]) == 1  # one replica cannot survive its own kill
    assert "--kill needs --replicas 2" in capsys.readouterr().err


def test_bench_release_bad_flag_is_one_line_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(
        sys.modules, "sealedml.bench.release", types.SimpleNamespace(run_release=lambda **kw: calls.append(kw))
    )
    assert main(["bench", "release", "--concurrency", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --concurrency") and err.count("\n") == 1
    assert calls == []


class _RayStandIn:
    """Stand-in for sealedml.platform.ray_engine: records the config instead of starting Ray."""

    def __init__(self) -> None:
        self.configs: list[Any] = []

    def RayEngineConfig(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    def serve_ray(self, config: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        self.configs.append(config)


def _platform_ray(tmp_path: Any, *extra: str) -> list[str]:
    return [
        "platform",
        "serve",
        "--keyservice",
        "http://127.0.0.1:1",
        "--store",
        str(tmp_path),
        "--engine",
        "ray",
        *extra,
    ]


@pytest.mark.parametrize(
    "flags",
    [["--warm-pool", "1"], ["--policy", "per-model"], ["--queue-limit", "3"], ["--queue-timeout", "5"]],
)
def test_platform_serve_on_ray_refuses_local_engine_flags(
    flags: list[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flag the Ray engine would ignore is a one-line error, not silently dropped."""
    ray = _RayStandIn()
    monkeypatch.setitem(sys.modules, "sealedml.platform.ray_engine", ray)
    assert main(_platform_ray(tmp_path, *flags)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --engine ray does not support") and err.count("\n") == 1
    assert all(flag in err for flag in flags if flag.startswith("--"))
    assert ray.configs == []


def test_platform_serve_on_ray_passes_tls_and_memory_to_the_replicas_workers(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealedml.attestation.simulated import SimulatedPlatform

    SimulatedPlatform.load()  # the default trust verifies this host's simulated KeyService
    ray = _RayStandIn()
    monkeypatch.setitem(sys.modules, "sealedml.platform.ray_engine", ray)
    assert main(_platform_ray(tmp_path, "--tls", "ra", "--memory-mb", "512")) == 0
    assert ray.configs[0]["tls"] == "ra" and ray.configs[0]["memory_mb"] == 512


def test_platform_serve_on_ray_passes_keyservice_trust_and_budget(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which KeyService the replicas trust reaches them (absolute paths); so does the memory budget."""
    ray = _RayStandIn()
    monkeypatch.setitem(sys.modules, "sealedml.platform.ray_engine", ray)
    policy = tmp_path / "ks.yaml"
    policy.write_text(f"version: 1\nsgx: {{mrenclave: ['{'ab' * 32}']}}\n")
    monkeypatch.chdir(tmp_path)
    argv = ["--keyservice-policy", "ks.yaml", "--pccs-url", "https://pccs.example:8081", "--memory-budget", "32MB"]
    assert main(_platform_ray(tmp_path, *argv)) == 0
    (config,) = ray.configs
    assert config["trust_options"] == {
        "measurement": None,
        "policy_file": policy.resolve(),
        "collateral": None,
        "pccs_url": "https://pccs.example:8081",
        "vcek": None,
    }
    assert config["memory_budget"] == 32 * 1000 * 1000


def test_platform_serve_on_ray_refuses_a_malformed_keyservice_policy(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ray = _RayStandIn()
    monkeypatch.setitem(sys.modules, "sealedml.platform.ray_engine", ray)
    policy = tmp_path / "ks.yaml"
    policy.write_text("version: 1\nsgx: {mrenclave: ['nothex']}\n")
    assert main(_platform_ray(tmp_path, "--keyservice-policy", str(policy), "--pccs-url", "https://p:1")) == 1
    assert "sgx.mrenclave" in capsys.readouterr().err and ray.configs == []


def test_ray_record_is_refused_with_the_local_engine(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["platform", "serve", "--keyservice", "http://127.0.0.1:1", "--store", str(tmp_path)]
    assert main([*argv, "--ray-record", str(tmp_path / "rec")]) == 1
    assert capsys.readouterr().err.strip() == "error: --ray-record applies to --engine ray"


def test_every_option_of_every_command_says_what_it_is_for() -> None:
    """`--help` explains every flag (issue 19): none is left with only its name."""
    import argparse

    from sealedml.cli.main import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif action.option_strings and not action.help:
                missing.append(" ".join([*path, action.option_strings[0]]))

    walk(build_parser(), [])
    assert missing == []
