"""The deployment recipes under deploy/ and docs/deployment.md are consistent with the code.

Nothing here needs SGX, a Docker engine or OpenWhisk: the Gramine template is rendered the way
``gramine-manifest`` renders it (Jinja2, ``StrictUndefined``) and parsed as TOML, the Makefile runs
against stand-ins for the Gramine tools, the Dockerfile's entrypoint runs under ``/bin/sh`` with a
stand-in ``python``, and every ``sealedml`` command quoted in the docs is checked against the real
argument parser.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import pytest

from sealedml.attestation.policy_document import describe_policy, load_policy
from sealedml.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
GRAMINE = REPO / "deploy" / "gramine"
TEMPLATE = GRAMINE / "sealedml.manifest.template"
MAKEFILE = GRAMINE / "Makefile"
OPENWHISK = REPO / "deploy" / "openwhisk"
DOCKERFILE = OPENWHISK / "Dockerfile"
POLICIES = REPO / "deploy" / "policies"
DOCS = [GRAMINE / "README.md", OPENWHISK / "README.md", REPO / "docs" / "deployment.md"]


# --------------------------------------------------------------------------- Gramine manifest
REQUIRED_MANIFEST_TEXT = [
    'loader.entrypoint = "file:{{ gramine.libos }}"',
    "libos.entrypoint = ",
    "loader.argv = [",
    "loader.env.",
    "fs.mounts = [",
    'type = "tmpfs", path = "/tmp"',
    'type = "encrypted"',
    'key_name = "_sgx_mrenclave"',
    'sgx.remote_attestation = "dcap"',
    "sgx.enclave_size = ",
    "sgx.max_threads = ",
    "sgx.trusted_files = [",
    "sgx.allowed_files = [",
    "sys.enable_extra_runtime_domain_names_conf = true",
    "sgx.debug = false",
]

FORBIDDEN_MANIFEST_TEXT = [
    "sgx.debug = true",
    "insecure__use_cmdline_argv",
    "insecure__use_host_env",
    "passthrough",
    "fs.insecure__keys",
    "sgx.thread_num",  # renamed to sgx.max_threads in Gramine 1.5
    "file_check_policy",
]


def test_manifest_template_mentions_every_required_key() -> None:
    text = TEMPLATE.read_text()
    for needle in REQUIRED_MANIFEST_TEXT:
        assert needle in text, needle
    for needle in FORBIDDEN_MANIFEST_TEXT:
        assert needle not in text, needle


class _Runtimedir:
    """Stand-in for graminelibos' ``gramine.runtimedir`` (callable, default libc glibc)."""

    def __call__(self, libc: str = "glibc") -> Path:
        return Path(f"/usr/lib/x86_64-linux-gnu/gramine/runtime/{libc}")

    def __str__(self) -> str:
        return str(self())


def _defines(role: str, **overrides: str) -> dict[str, str]:
    """The -D variables deploy/gramine/Makefile passes (all strings, as gramine-manifest gets them)."""
    common = {
        "entrypoint": "/usr/bin/python3.12",
        "python_stdlib": "/usr/lib/python3.12",
        "venv": "/opt/sealedml/venv",
        "venv_site": "/opt/sealedml/venv/lib/python3.12/site-packages",
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "log_level": "error",
        "edmm": "false",
        "isvsvn": "1",
        "tls": "none",
    }
    per_role = {
        "keyservice": {
            "role": "keyservice",
            "isvprodid": "1",
            "port": "8700",
            "enclave_size": "2G",
            "max_threads": "64",
            "accept": "sgx",
            "lease_ttl": "60",
            "data_dir": "/var/lib/sealedml/keyservice",
            "cache_dir": "/var/lib/sealedml/cache",
            "policy": "",
            "pccs_url": "https://pccs.example:8081",
            "pccs_ca": "",
            "collateral": "",
        },
        "worker": {
            "role": "worker",
            "isvprodid": "2",
            "port": "8080",
            "enclave_size": "8G",
            "max_threads": "128",
            "keyservice_url": "http://10.0.0.5:8700",
            "keyservice_policy": "/etc/sealedml/keyservice-for-workers.yaml",
            "pccs_url": "https://pccs.example:8081",
            "pccs_ca": "",
            "collateral": "",
            "store_dir": "/var/lib/sealedml/store",
            "concurrency": "4",
            "model_cache_mb": "2048",
        },
    }[role]
    return {**common, **per_role, **overrides}


def _render(template: str, defines: dict[str, Any]) -> str:
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.globals["gramine"] = {
        "libos": Path("/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"),
        "pkglibdir": Path("/usr/lib/x86_64-linux-gnu/gramine"),
        "runtimedir": _Runtimedir(),
    }
    return env.from_string(template).render(**defines)


# Keys Gramine's own schema (graminelibos/manifest_check.py, Gramine 1.7/1.8) accepts, by table.
_KNOWN_KEYS: dict[str, set[str]] = {
    "": {"fs", "libos", "loader", "sgx", "sys"},
    "fs": {"mounts", "root", "start_dir", "insecure__keys"},
    "libos": {"entrypoint", "check_invalid_pointers"},
    "loader": {
        "entrypoint",
        "argv",
        "argv_src_file",
        "env",
        "env_src_file",
        "gid",
        "insecure__use_cmdline_argv",
        "insecure__use_host_env",
        "insecure__disable_aslr",
        "log_file",
        "log_level",
        "uid",
    },
    "sgx": {
        "allowed_files",
        "cpu_features",
        "debug",
        "edmm_enable",
        "enable_stats",
        "enclave_size",
        "file_check_policy",
        "insecure__allow_memfaults_without_exinfo",
        "insecure__rpc_thread_num",
        "isvprodid",
        "isvsvn",
        "max_threads",
        "preheat_enclave",
        "profile",
        "ra_client_linkable",
        "ra_client_spid",
        "remote_attestation",
        "seal_key",
        "trusted_files",
        "use_exinfo",
        "vtune_profile",
    },
    "sys": {
        "allowed_ioctls",
        "brk",
        "disallow_subprocesses",
        "enable_extra_runtime_domain_names_conf",
        "enable_sigterm_injection",
        "experimental__enable_flock",
        "insecure__allow_eventfd",
        "ioctl_structs",
        "stack",
    },
}


def _check_schema(manifest: dict[str, Any]) -> None:
    assert set(manifest) <= _KNOWN_KEYS[""], set(manifest) - _KNOWN_KEYS[""]
    for table in ("fs", "libos", "loader", "sgx", "sys"):
        assert set(manifest[table]) <= _KNOWN_KEYS[table], (table, set(manifest[table]) - _KNOWN_KEYS[table])
    assert set(manifest["sys"]["stack"]) == {"size"}
    assert isinstance(manifest["loader"]["entrypoint"], str) and isinstance(manifest["libos"]["entrypoint"], str)
    assert manifest["loader"]["log_level"] in {"none", "error", "warning", "debug", "trace", "all"}
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["loader"]["env"].items())
    assert all(isinstance(a, str) for a in manifest["loader"]["argv"])
    for mount in manifest["fs"]["mounts"]:
        kind = mount.get("type", "chroot")
        allowed = {
            "chroot": {"type", "path", "uri"},
            "encrypted": {"type", "path", "uri", "key_name"},
            "tmpfs": {"type", "path", "uri"},
        }[kind]
        assert set(mount) <= allowed and "path" in mount, mount
        assert mount["path"].startswith("/"), mount
        if kind != "tmpfs":
            assert mount["uri"].startswith("file:/"), mount
    for key in ("trusted_files", "allowed_files"):
        assert all(isinstance(f, str) and f.startswith("file:/") for f in manifest["sgx"][key]), key
    for key in ("max_threads", "isvprodid", "isvsvn"):
        assert isinstance(manifest["sgx"][key], int), key
    assert isinstance(manifest["sgx"]["edmm_enable"], bool)
    assert re.fullmatch(r"\d+[KMG]", manifest["sgx"]["enclave_size"])


def _mounts(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["path"]: m for m in manifest["fs"]["mounts"]}


def _parsed_argv(manifest: dict[str, Any]) -> Any:
    argv = manifest["loader"]["argv"]
    assert argv[:4] == [manifest["libos"]["entrypoint"], "-S", "-m", "sealedml"], argv
    return build_parser().parse_args(argv[4:])


KEYSERVICE_VARIANTS = {
    "pccs": {},
    "pccs+policy+ca": {"policy": "/etc/sealedml/runtime-sgx.yaml", "pccs_ca": "/etc/pccs/ca.pem"},
    "offline-collateral": {"pccs_url": "", "collateral": "/etc/sealedml/collateral.json"},
    "all-tees": {"accept": "sgx,tdx,sev-snp"},
}


@pytest.mark.parametrize("variant", sorted(KEYSERVICE_VARIANTS))
def test_keyservice_manifest_renders_to_a_valid_locked_down_manifest(variant: str) -> None:
    defines = _defines("keyservice", **KEYSERVICE_VARIANTS[variant])
    manifest = tomllib.loads(_render(TEMPLATE.read_text(), defines))
    _check_schema(manifest)
    sgx, mounts = manifest["sgx"], _mounts(manifest)
    assert sgx["debug"] is False and sgx["remote_attestation"] == "dcap" and sgx["isvprodid"] == 1

    args = _parsed_argv(manifest)
    assert args.command == "keyservice" and args.sub == "serve"
    assert args.tee == "gramine" and args.host == "0.0.0.0" and args.port == 8700
    assert args.accept == defines["accept"]
    # The state lives on the MRENCLAVE-keyed encrypted mount, nowhere else.
    data = mounts[str(args.data_dir)]
    assert data == {
        "type": "encrypted",
        "path": "/sealedml/data",
        "uri": f"file:{defines['data_dir']}",
        "key_name": "_sgx_mrenclave",
    }
    assert mounts["/tmp"]["type"] == "tmpfs"
    assert manifest["loader"]["env"]["SEALEDML_HOME"].startswith("/tmp/")
    assert mounts[str(args.cache_dir)]["uri"] == f"file:{defines['cache_dir']}"
    assert f"file:{defines['cache_dir']}/" in sgx["allowed_files"]
    # SGX workers need collateral: exactly one source.
    assert (args.pccs_url is not None) != (args.collateral is not None)
    if defines["policy"]:
        assert mounts[str(args.policy)]["uri"] == f"file:{defines['policy']}"
        assert f"file:{defines['policy']}" in sgx["trusted_files"]  # measured, never host-controlled
    else:
        assert args.policy is None
    if defines["collateral"]:
        assert mounts[str(args.collateral)]["uri"] == f"file:{defines['collateral']}"
        assert f"file:{defines['collateral']}" in sgx["allowed_files"]  # signed by Intel
    if defines["pccs_ca"]:
        ca = manifest["loader"]["env"]["SSL_CERT_FILE"]
        assert (
            mounts[ca]["uri"] == f"file:{defines['pccs_ca']}" and f"file:{defines['pccs_ca']}" in sgx["trusted_files"]
        )
    # Only signed collateral may come from the host unmeasured.
    assert set(sgx["allowed_files"]) <= {f"file:{defines['cache_dir']}/", f"file:{defines['collateral']}"}
    assert "/models" not in mounts


WORKER_VARIANTS = {
    "pccs": {},
    "pccs+ca": {"pccs_ca": "/etc/pccs/ca.pem"},
    "offline-collateral": {"pccs_url": "", "collateral": "/etc/sealedml/collateral.json"},
}


@pytest.mark.parametrize("variant", sorted(WORKER_VARIANTS))
def test_worker_manifest_renders_to_a_valid_locked_down_manifest(variant: str) -> None:
    defines = _defines("worker", **WORKER_VARIANTS[variant])
    manifest = tomllib.loads(_render(TEMPLATE.read_text(), defines))
    _check_schema(manifest)
    sgx, mounts = manifest["sgx"], _mounts(manifest)
    assert sgx["debug"] is False and sgx["remote_attestation"] == "dcap" and sgx["isvprodid"] == 2

    args = _parsed_argv(manifest)
    assert args.command == "worker" and args.sub == "serve"
    assert args.tee == "gramine" and args.keyservice == defines["keyservice_url"] and args.port == 8080
    assert args.concurrency == 4 and args.model_cache_mb == 2048
    assert mounts[str(args.store)] == {"path": "/models", "uri": f"file:{defines['store_dir']}"}
    # Which KeyService the worker trusts is fixed in the measured image: a trusted (hashed) file.
    assert mounts[str(args.keyservice_policy)]["uri"] == f"file:{defines['keyservice_policy']}"
    assert f"file:{defines['keyservice_policy']}" in sgx["trusted_files"]
    assert args.keyservice_measurement is None
    # The KeyService is in SGX: the worker needs collateral for its quote, from exactly one source.
    assert (args.pccs_url is not None) != (args.collateral is not None)
    if defines["collateral"]:
        assert mounts[str(args.collateral)]["uri"] == f"file:{defines['collateral']}"
    if defines["pccs_ca"]:
        ca = manifest["loader"]["env"]["SSL_CERT_FILE"]
        assert mounts[ca]["uri"] == f"file:{defines['pccs_ca']}"
        assert f"file:{defines['pccs_ca']}" in sgx["trusted_files"]
    else:
        assert "SSL_CERT_FILE" not in manifest["loader"]["env"]
    # Ciphertext and Intel-signed collateral only.
    expected = [f"file:{defines['store_dir']}/"] + ([f"file:{defines['collateral']}"] if defines["collateral"] else [])
    assert sgx["allowed_files"] == expected
    assert not [m for m in manifest["fs"]["mounts"] if m.get("type") == "encrypted"]


@pytest.mark.parametrize("role", ["keyservice", "worker"])
def test_manifest_trusts_the_code_and_isolates_python(role: str) -> None:
    defines = _defines(role)
    manifest = tomllib.loads(_render(TEMPLATE.read_text(), defines))
    trusted = set(manifest["sgx"]["trusted_files"])
    for needed in (
        "file:/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
        f"file:{defines['entrypoint']}",
        f"file:{defines['python_stdlib']}/",
        f"file:{defines['venv_site']}/",
        "file:/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc/",
        f"file:{defines['arch_libdir']}/",
    ):
        assert needed in trusted, needed
    env = manifest["loader"]["env"]
    assert env["PYTHONPATH"] == defines["venv_site"] and env["PYTHONSAFEPATH"] == "1"
    assert "-S" in manifest["loader"]["argv"]
    mounts = _mounts(manifest)
    for path in ("/lib", defines["arch_libdir"], "/usr", defines["venv"], defines["python_stdlib"], "/tmp"):
        assert path in mounts, path
    assert manifest["sys"]["enable_extra_runtime_domain_names_conf"] is True
    assert manifest["sys"]["disallow_subprocesses"] is True


def test_missing_template_variable_is_an_error() -> None:
    jinja2 = pytest.importorskip("jinja2")
    defines = _defines("worker")
    del defines["keyservice_url"]
    with pytest.raises(jinja2.UndefinedError):
        _render(TEMPLATE.read_text(), defines)


# --------------------------------------------------------------------------- Gramine Makefile
_FAKE_MANIFEST = f"""#!{sys.executable}
# Stand-in for gramine-manifest: the same Jinja2 environment, -D parsing and output.
import sys, pathlib, jinja2
defines, args = {{}}, sys.argv[1:]
while args and args[0].startswith("-D"):
    k, _, v = args.pop(0)[2:].partition("=")
    defines[k] = v
class Runtimedir:
    def __call__(self, libc="glibc"):
        return pathlib.Path("/usr/lib/x86_64-linux-gnu/gramine/runtime") / libc
env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
env.globals["gramine"] = {{"libos": pathlib.Path("/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"),
                          "runtimedir": Runtimedir()}}
sys.stdout.write(env.from_string(open(args[0]).read()).render(**defines))
"""

_FAKE_SIGN = f"""#!{sys.executable}
# Stand-in for gramine-sgx-sign: validates the manifest (TOML) and writes .manifest.sgx, .sig, depfile.
import argparse, hashlib, json, os, tomllib
p = argparse.ArgumentParser()
p.add_argument("--key", required=True); p.add_argument("--manifest", required=True)
p.add_argument("--output", required=True); p.add_argument("--depfile")
a = p.parse_args()
with open(os.environ["FAKE_GRAMINE_LOG"], "a") as log:
    log.write("sign " + a.manifest + "\\n")
assert open(a.key).read(), "empty key"
text = open(a.manifest).read()
m = tomllib.loads(text)
open(a.output, "w").write(text)
sig = a.manifest[: -len(".manifest")] + ".sig"
json.dump({{"mr_enclave": hashlib.sha256(text.encode()).hexdigest(), "debug": m["sgx"]["debug"],
           "isv_prod_id": m["sgx"]["isvprodid"], "isv_svn": m["sgx"]["isvsvn"]}}, open(sig, "w"))
if a.depfile:
    open(a.depfile, "w").write(a.output + ": " + a.key + "\\n")
"""

_FAKE_SIGSTRUCT_VIEW = f"""#!{sys.executable}
# Stand-in for gramine-sgx-sigstruct-view --output-format json SIGFILE.
import json, sys
assert sys.argv[1:3] == ["--output-format", "json"], sys.argv
s = json.load(open(sys.argv[3]))
print(json.dumps({{"mr_signer": "ab" * 32, "mr_enclave": s["mr_enclave"], "isv_prod_id": s["isv_prod_id"],
                  "isv_svn": s["isv_svn"], "debug_enclave": s["debug"]}}, indent=4))
"""


@pytest.fixture
def gramine_workdir(tmp_path: Path) -> tuple[Path, dict[str, str], list[str]]:
    pytest.importorskip("jinja2")
    if shutil.which("make") is None or shutil.which("bash") is None:
        pytest.skip("make/bash not available")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "python3").exists():
        pytest.skip("the test interpreter is not in a venv with bin/python3")
    work = tmp_path / "gramine"
    work.mkdir()
    shutil.copy(MAKEFILE, work / "Makefile")
    shutil.copy(TEMPLATE, work / "sealedml.manifest.template")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (
        ("gramine-manifest", _FAKE_MANIFEST),
        ("gramine-sgx-sign", _FAKE_SIGN),
        ("gramine-sgx-sigstruct-view", _FAKE_SIGSTRUCT_VIEW),
    ):
        tool = bindir / name
        tool.write_text(body)
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    ks_policy = tmp_path / "keyservice-for-workers.yaml"
    shutil.copy(POLICIES / "keyservice-sgx-for-workers.yaml", ks_policy)
    key = tmp_path / "enclave-key.pem"
    key.write_text("-----BEGIN RSA PRIVATE KEY-----\nfake\n-----END RSA PRIVATE KEY-----\n")
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_GRAMINE_LOG": str(tmp_path / "gramine.log"),
        "MAKEFLAGS": "",
    }
    variables = [
        f"VENV={venv}",
        f"SGX_SIGNER_KEY={key}",
        f"PYTHON={sys.executable}",
        "ARCH_LIBDIR=/lib/x86_64-linux-gnu",
        f"KS_DATA_DIR={tmp_path / 'ks'}",
        f"KS_CACHE_DIR={tmp_path / 'cache'}",
        f"STORE_DIR={tmp_path / 'store'}",
        "KEYSERVICE_URL=http://10.0.0.5:8700",
        "PCCS_URL=https://pccs.example:8081",
        f"WORKER_KS_POLICY={ks_policy}",
    ]
    return work, env, variables


def _make(work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_makefile_renders_signs_and_prints_the_mrenclave(gramine_workdir) -> None:
    work, env, variables = gramine_workdir
    built = _make(work, env, *variables)
    assert built.returncode == 0, built.stdout + built.stderr
    for role in ("keyservice", "worker"):
        manifest = tomllib.loads((work / f"sealedml-{role}.manifest").read_text())
        assert manifest["loader"]["argv"][0] == os.path.realpath(Path(sys.prefix) / "bin" / "python3")
        assert manifest["loader"]["env"]["PYTHONPATH"] == sysconfig.get_paths()["purelib"]
        assert (work / f"sealedml-{role}.manifest.sgx").exists() and (work / f"sealedml-{role}.sig").exists()
        args = build_parser().parse_args(manifest["loader"]["argv"][4:])
        assert args.command == role

    shown = _make(work, env, "mrenclave")
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(": ", 1) for line in shown.stdout.splitlines())
    assert set(lines) == {"keyservice", "worker"}
    worker = json.loads(lines["worker"])
    assert worker["isv_prod_id"] == 2 and worker["debug_enclave"] is False
    assert json.loads(lines["keyservice"])["isv_prod_id"] == 1
    only_hex = _make(work, env, "-s", "mrenclave-worker")
    assert only_hex.stdout.strip() == worker["mr_enclave"] and re.fullmatch(r"[0-9a-f]{64}", only_hex.stdout.strip())
    signer = _make(work, env, "-s", "mrsigner-keyservice")  # what the workers' KeyService policy names
    assert signer.returncode == 0 and signer.stdout.strip() == worker["mr_signer"], signer.stderr
    missing = _make(work, env, "-s", "mrsigner-nothing")
    assert missing.returncode != 0 and "sealedml-nothing.sig missing" in missing.stderr

    # Same configuration again: nothing is signed twice; another configuration: only that enclave.
    log = Path(env["FAKE_GRAMINE_LOG"])
    signed = log.read_text().count("sign ")
    assert signed == 2
    assert _make(work, env, *variables).returncode == 0
    assert log.read_text().count("sign ") == 2
    assert _make(work, env, *variables, "WORKER_PORT=9090").returncode == 0
    assert log.read_text().splitlines()[-1] == "sign sealedml-worker.manifest"


def test_makefile_refuses_incomplete_configurations(gramine_workdir) -> None:
    work, env, variables = gramine_workdir
    no_url = [v for v in variables if not v.startswith("KEYSERVICE_URL=")]
    result = _make(work, env, *no_url, "worker")
    assert result.returncode != 0 and "KEYSERVICE_URL" in result.stdout + result.stderr
    no_collateral = [v for v in variables if not v.startswith("PCCS_URL=")]
    result = _make(work, env, *no_collateral, "keyservice")
    assert result.returncode != 0 and "PCCS_URL" in result.stdout + result.stderr
    result = _make(work, env, *no_collateral, "worker")
    assert result.returncode != 0 and "WORKER_COLLATERAL" in result.stdout + result.stderr
    no_trust = [v for v in variables if not v.startswith("WORKER_KS_POLICY=")]
    result = _make(work, env, *no_trust, "worker")
    assert result.returncode != 0 and "WORKER_KS_POLICY" in result.stdout + result.stderr
    assert not (work / "sealedml-worker.sig").exists()


def test_makefile_refuses_a_debug_enclave(gramine_workdir) -> None:
    work, env, variables = gramine_workdir
    template = work / "sealedml.manifest.template"
    template.write_text(template.read_text().replace("sgx.debug = false", "sgx.debug = true"))
    result = _make(work, env, *variables, "worker")
    assert result.returncode != 0 and "DEBUG" in result.stderr
    assert not (work / "sealedml-worker.sig").exists()


# --------------------------------------------------------------------------- OpenWhisk image
def _dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of a Dockerfile, continuation lines joined (deploy/docker's are read the same way)."""
    text = path.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_package_on_python_311_slim() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("EXPOSE", "8080") in instructions
    assert any(word == "RUN" and "pip install ." in rest for word, rest in instructions)
    for word, rest in instructions:
        if word == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), source


def test_dockerfile_entrypoint_runs_sealedml_worker_serve_through_a_shell() -> None:
    entrypoints = [json.loads(rest) for word, rest in _dockerfile_instructions() if word == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    entrypoint = entrypoints[0]
    assert entrypoint[:2] == ["/bin/sh", "-c"], "variables in an exec-form command are not expanded"
    assert "sealedml worker serve" in entrypoint[2]
    for word, rest in _dockerfile_instructions():
        if word in ("CMD", "ENTRYPOINT") and rest.startswith("["):
            argv = json.loads(rest)
            assert "${" not in " ".join(argv) or argv[:2] == ["/bin/sh", "-c"], (word, argv)


def _run_entrypoint(tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the image's ENTRYPOINT with /bin/sh and a stand-in python that records its argv."""
    entrypoint = next(json.loads(rest) for word, rest in _dockerfile_instructions() if word == "ENTRYPOINT")
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "python"
    fake.write_text(
        f'#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open("{tmp_path}/argv.json", "w"))\n'
    )
    fake.chmod(0o755)
    defaults = {k: v for k, v in _dockerfile_env().items() if k != "SEALEDML_KEYSERVICE"}
    full_env = {"PATH": f"{bindir}{os.pathsep}/usr/bin:/bin", **defaults, **env}
    return subprocess.run([*entrypoint, *extra], env=full_env, capture_output=True, text=True, timeout=30, check=False)


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_entrypoint_expands_the_configuration_into_a_valid_command_line(tmp_path: Path) -> None:
    result = _run_entrypoint(tmp_path, {"SEALEDML_KEYSERVICE": "http://ks.internal:8700"})
    assert result.returncode == 0, result.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:2] == ["-m", "sealedml"]
    args = build_parser().parse_args(argv[2:])
    assert (args.command, args.sub) == ("worker", "serve")
    assert args.keyservice == "http://ks.internal:8700"
    assert (args.host, args.port, str(args.store), args.concurrency, args.tee) == (
        "0.0.0.0",
        8080,
        "/models",
        4,
        "auto",
    )
    assert args.model_cache_mb == 768

    result = _run_entrypoint(
        tmp_path,
        {
            "SEALEDML_KEYSERVICE": "http://ks:1",
            "SEALEDML_STORE": "/srv/store",
            "SEALEDML_CONCURRENCY": "8",
            "SEALEDML_TEE": "tsm",
        },
        "--tls",
        "ra",
    )
    assert result.returncode == 0, result.stderr
    args = build_parser().parse_args(json.loads((tmp_path / "argv.json").read_text())[2:])
    assert (str(args.store), args.concurrency, args.tee, args.tls) == ("/srv/store", 8, "tsm", "ra")
    assert args.memory_budget is None

    result = _run_entrypoint(tmp_path, {"SEALEDML_KEYSERVICE": "http://ks:1", "SEALEDML_MEMORY_BUDGET": "32MB"})
    assert result.returncode == 0, result.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[argv.index("--memory-budget") + 1] == "32MB"
    assert build_parser().parse_args(argv[2:]).memory_budget is not None


def test_entrypoint_refuses_to_start_without_a_keyservice(tmp_path: Path) -> None:
    result = _run_entrypoint(tmp_path, {"SEALEDML_KEYSERVICE": ""})
    assert result.returncode != 0
    assert "SEALEDML_KEYSERVICE" in result.stderr
    assert not (tmp_path / "argv.json").exists()


def test_action_env_example_lists_exactly_the_image_settings() -> None:
    example = OPENWHISK / "action.env.example"
    names = {
        line.split("=", 1)[0] for line in example.read_text().splitlines() if line.strip() and not line.startswith("#")
    }
    image = {k for k in _dockerfile_env() if k.startswith("SEALEDML_") and k != "SEALEDML_HOME"}
    assert names == image
    entrypoint = next(rest for word, rest in _dockerfile_instructions() if word == "ENTRYPOINT")
    for name in names - {"SEALEDML_LOG_LEVEL"}:  # SEALEDML_LOG_LEVEL is read by sealedml itself
        assert "${" + name in entrypoint, name
    assert "SEALEDML_LOG_LEVEL" in (REPO / "src" / "sealedml" / "cli" / "main.py").read_text()


# --------------------------------------------------------------------------- policies
def _policy_files() -> list[Path]:
    return sorted(POLICIES.glob("*.yaml"))


def test_there_are_example_policies_for_every_tee() -> None:
    names = {p.name for p in _policy_files()}
    assert {
        "keyservice-sgx.yaml",
        "keyservice-sgx-for-workers.yaml",
        "runtime-sgx.yaml",
        "runtime-tdx.yaml",
        "runtime-sev-snp.yaml",
    } <= names


@pytest.mark.parametrize("path", _policy_files(), ids=lambda p: p.name)
def test_policy_examples_load_and_accept_nothing_until_edited(path: Path) -> None:
    policy = load_policy(path)
    summary = describe_policy(policy)
    assert not summary["denies_everything"]
    assert summary["allow_debug"] is False
    assert "Revoked" not in summary["tcb_statuses"]
    # Placeholders: all-zero reference values match no real enclave or VM. Examples that name an
    # enclave by signer instead of measurement have an all-zero MRSIGNER and a product id.
    named = {m for rule in policy.tee_rules.values() for m in rule.measurements | rule.signers}
    assert named and all(set(m) == {"0"} for m in named)
    for rule in policy.tee_rules.values():
        if rule.identifies_by_signer:
            assert rule.reference_values.get("isv_prod_id") and "isv_svn" in rule.minimums


# --------------------------------------------------------------------------- commands in the docs
_SHELL_STOP = {"|", "||", "&&", ";", ">", ">>", "<", "2>", "&"}


def _code_snippets(text: str) -> list[str]:
    """Shell lines of fenced blocks (not python/toml/yaml/…) and inline code spans."""
    snippets: list[str] = []
    for match in re.finditer(r"```([a-z]*)\n(.*?)```", text, flags=re.S):
        if match.group(1) in ("", "sh", "bash", "console", "shell"):
            snippets.extend(match.group(2).replace("\\\n", " ").splitlines())
    without_blocks = re.sub(r"```.*?```", "", text, flags=re.S)
    snippets.extend(re.findall(r"`([^`\n]+)`", without_blocks))
    return snippets


def _sealedml_commands(snippet: str) -> list[list[str]]:
    cleaned = snippet.replace("\\|", " ").replace("…", " ")
    try:
        tokens = shlex.split(cleaned, comments=True)
    except ValueError:
        return []
    commands = []
    for i, token in enumerate(tokens):
        if token == "sealedml" and (
            i == 0 or tokens[i - 1] in ("-m", "$", *_SHELL_STOP) or tokens[i - 1].endswith("=")
        ):
            rest = []
            for t in tokens[i + 1 :]:
                if t in _SHELL_STOP or t.startswith("$(") or t == ")":
                    break
                rest.append(t)
            commands.append(rest)
    return commands


def _subparser_path(tokens: list[str]) -> tuple[Any, list[str]]:
    """The deepest sub-parser named by the leading words of ``tokens``, and the words used."""
    import argparse

    parser: argparse.ArgumentParser = build_parser()
    path: list[str] = []
    for token in tokens:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or token not in subs[0].choices:
            break
        parser = subs[0].choices[token]
        path.append(token)
    return parser, path


def _option_strings(parser: Any) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def _documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in [*DOCS, *_policy_files()]:
        text = doc.read_text()
        if doc.suffix == ".yaml":
            text = "\n".join("`" + line.lstrip("# ").strip() + "`" for line in text.splitlines() if "sealedml " in line)
        for snippet in _code_snippets(text):
            for command in _sealedml_commands(snippet):
                found.append((doc.name, command))
    return found


def test_docs_cite_only_existing_sealedml_commands_and_flags() -> None:
    top_level = _option_strings(build_parser())
    commands = _documented_commands()
    assert len(commands) >= 20, commands
    checked_paths = set()
    for doc, tokens in commands:
        parser, path = _subparser_path(tokens)
        assert path, (doc, tokens)
        if len(tokens) > len(path) and parser is build_parser():
            pytest.fail(f"{doc}: unknown command {tokens}")
        known = _option_strings(parser) | top_level
        for token in tokens[len(path) :]:
            flag = token.strip("[]()").split("=", 1)[0]
            if flag.startswith("--"):
                assert flag in known, f"{doc}: `sealedml {' '.join(path)}` has no option {flag}"
        checked_paths.add(" ".join(path))
    for expected in (
        "keyservice serve",
        "worker serve",
        "model allow-runtime",
        "model enable",
        "attest verify",
        "register",
        "measurement",
    ):
        assert expected in checked_paths, expected


def test_documented_subcommands_are_complete_commands() -> None:
    """`sealedml model` alone is not a command: every citation reaches a leaf parser."""
    import argparse

    for doc, tokens in _documented_commands():
        parser, path = _subparser_path(tokens)
        leaf = not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        assert leaf, f"{doc}: incomplete command `sealedml {' '.join(tokens)}`"


_WSK_FLAGS = {
    ("action", "create"): {
        "--docker",
        "--concurrency",
        "--memory",
        "--timeout",
        "-a",
        "--annotation",
        "-p",
        "--param",
        "-P",
        "--param-file",
        "--web",
        "--kind",
        "--main",
        "--logsize",
    },
    ("action", "invoke"): {"--blocking", "-b", "--result", "-r", "-p", "--param", "-P", "--param-file"},
    ("activation", "result"): set(),
    ("property", "get"): {"--auth", "--apihost"},
}


def test_docs_cite_only_wsk_and_docker_options_that_exist() -> None:
    text = "\n".join(doc.read_text() for doc in DOCS)
    dockerfile_args = {rest.split("=", 1)[0] for word, rest in _dockerfile_instructions() if word == "ARG"}
    wsk_seen = 0
    for snippet in _code_snippets(text):
        try:
            tokens = shlex.split(snippet.replace("…", " "), comments=True)
        except ValueError:
            continue
        for i, token in enumerate(tokens):
            if token == "wsk" and i + 2 < len(tokens) and (tokens[i + 1], tokens[i + 2]) in _WSK_FLAGS:
                allowed = _WSK_FLAGS[(tokens[i + 1], tokens[i + 2])]
                for t in tokens[i + 3 :]:
                    if t in _SHELL_STOP:
                        break
                    if t.startswith("-") and not re.fullmatch(r"-?\d+", t):
                        assert t in allowed, f"wsk {tokens[i + 1]} {tokens[i + 2]}: {t}"
                wsk_seen += 1
            if token == "--build-arg" and i + 1 < len(tokens):
                assert tokens[i + 1].split("=", 1)[0] in dockerfile_args, tokens[i + 1]
    assert wsk_seen >= 2


def test_gramine_readme_names_only_makefile_variables_and_targets() -> None:
    makefile = MAKEFILE.read_text()
    variables = set(re.findall(r"^([A-Z_]+) \?=", makefile, flags=re.M))
    readme = (GRAMINE / "README.md").read_text()
    # VAR=value on `make` command lines, and the names listed in the "Settings" paragraph.
    make_lines = [line for line in _code_snippets(readme) if line.strip().startswith("make ")]
    cited = {name for line in make_lines for name in re.findall(r"\b([A-Z][A-Z_]+)=", line)}
    settings = readme[readme.index("Settings (all") :].split("\n\n", 1)[0]
    cited |= set(re.findall(r"`([A-Z][A-Z_]+)`", settings))
    cited.discard("VAR")  # "make VAR=value"
    assert len(cited) >= 20, cited
    assert cited <= variables, cited - variables
    targets = set(re.findall(r"^([a-z][a-z-]*)\s*:", makefile, flags=re.M)) | {
        "mrenclave-worker",
        "mrenclave-keyservice",
        "mrsigner-keyservice",
        "run-keyservice",
        "run-worker",
    }
    for line in make_lines:
        for word in shlex.split(line, comments=True)[1:]:
            if not word.startswith("-") and "=" not in word:
                assert word in targets, word


def test_relative_links_in_the_deployment_docs_resolve() -> None:
    for doc in DOCS:
        for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", link) or link.startswith("#"):
                continue
            target = (doc.parent / link.split("#", 1)[0]).resolve()
            assert target.exists(), f"{doc.relative_to(REPO)}: {link}"


def test_the_template_documents_every_variable_it_uses() -> None:
    text = TEMPLATE.read_text()
    header = text.split("loader.entrypoint", 1)[0]
    used = set(re.findall(r"{{\s*([a-z_]+)\s*}}", text)) | set(re.findall(r"{%\s*(?:el)?if\s+([a-z_]+)", text))
    used |= set(re.findall(r"and\s+([a-z_]+)\s*%}", text))
    used -= {"gramine"}
    for name in used:
        assert re.search(rf"\b{name}\b", header), name
    makefile = MAKEFILE.read_text()
    for name in used:
        assert f"-D{name}=" in makefile, name


def test_docs_mention_the_known_blockers() -> None:
    """The deployment docs must not promise what this build cannot do."""
    deployment = (REPO / "docs" / "deployment.md").read_text()
    for needle in (
        "UpToDate",
        "not supported in this build",
        "mount -t configfs none /sys/kernel/config",
        "sev-snp-measure --mode snp",
        "--accept tdx --pccs-url",
        "--accept sev-snp",
    ):
        assert needle in deployment, needle
    assert "would make the invoker destroy it" in (OPENWHISK / "README.md").read_text()
