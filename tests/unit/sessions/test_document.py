"""Session documents: validation, k-of-n signed updates along a digest chain, bundles."""

from __future__ import annotations

import pytest

from sealedml.crypto import SigningKey
from sealedml.sessions.document import SessionError, SessionUpdateError, check_update, load_session, sign_session

KEYS = [SigningKey.generate() for _ in range(3)]
MEASUREMENT = "ab" * 32


def _document(revision: int = 1, predecessor: str | None = None, threshold: int = 2, extra: str = "") -> str:
    signers = "\n".join(f"    - {key.public_bytes.hex()}" for key in KEYS)
    return f"""
version: 1
name: acme/trainer
revision: {revision}
{"predecessor: '" + predecessor + "'" if predecessor else ""}
access_policy:
  signers:
{signers}
  threshold: {threshold}
secrets:
  api_token: {{kind: ascii, size: 24}}
  volume_key: {{kind: binary, size: 32}}
services:
  train:
    measurements: {{simulated: [{MEASUREMENT}]}}
    argv: ["--token", "${{secret:api_token}}"]
    env: {{API_TOKEN: "${{secret:api_token}}", KEY_HEX: "${{secret:volume_key:hex}}"{extra}}}
    files: {{/run/secrets/token: "${{secret:api_token}}"}}
    volumes: {{data: volume_key}}
"""


def test_a_session_document_parses_and_renders_its_bundle() -> None:
    document = load_session(_document())
    assert document.name == "acme/trainer" and document.revision == 1 and len(document.digest()) == 64
    bundle = document.bundle("train", {"api_token": b"t0ken", "volume_key": bytes(range(32))})
    assert bundle.argv == ["--token", "t0ken"]
    assert bundle.env == {"API_TOKEN": "t0ken", "KEY_HEX": bytes(range(32)).hex()}
    assert bundle.files == {"/run/secrets/token": b"t0ken"} and bundle.volume_keys == {"data": bytes(range(32))}
    with pytest.raises(SessionError, match="no service"):
        document.bundle("serve", {})
    with pytest.raises(SessionError, match="no value yet"):
        document.bundle("train", {})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.replace('${secret:api_token}"]', '${secret:nope}"]'), "lacks"),
        (lambda d: d.replace("${secret:volume_key:hex}", "${secret:volume_key}"), "needs :hex or :base64"),
        (lambda d: d.replace("threshold: 2", "threshold: 4"), "threshold exceeds"),
        (lambda d: d.replace("revision: 1", "revision: 2"), "predecessor"),
        (lambda d: d.replace("name: acme/trainer", "name: ../etc"), "name"),
        (lambda d: d.replace("    measurements: {simulated: [" + MEASUREMENT + "]}\n", ""), "measurements"),
        (lambda d: d + "\nunexpected: 1\n", "unexpected"),
        (lambda d: "[1, 2]", "mapping"),
        (lambda d: "{unclosed", "unreadable"),
    ],
)
def test_malformed_documents_are_refused_naming_the_problem(change: object, message: str) -> None:
    with pytest.raises(SessionError, match=message):
        load_session(change(_document()))  # type: ignore[operator]


def test_creation_needs_k_of_n_signatures_of_its_own_signers() -> None:
    document = load_session(_document())
    stranger = SigningKey.generate()
    check_update(None, document, [sign_session(document, KEYS[0]), sign_session(document, KEYS[2])])
    for signatures in (
        [sign_session(document, KEYS[0])],  # one of two
        [sign_session(document, KEYS[0])] * 2,  # the same signer twice counts once
        [sign_session(document, KEYS[0]), sign_session(document, stranger)],  # a stranger counts for nothing
    ):
        with pytest.raises(SessionUpdateError, match="1 valid signature"):
            check_update(None, document, signatures)
    other = load_session(_document(threshold=1))
    with pytest.raises(SessionUpdateError, match="0 valid"):  # signatures over another document
        check_update(None, document, [sign_session(other, KEYS[0]), sign_session(other, KEYS[1])])


def test_an_update_follows_the_chain_and_is_judged_by_the_current_policy() -> None:
    first = load_session(_document())
    second = load_session(_document(revision=2, predecessor=first.digest(), threshold=1))
    check_update(first, second, [sign_session(second, KEYS[1]), sign_session(second, KEYS[2])])
    with pytest.raises(SessionUpdateError, match="1 valid"):  # its own lower threshold does not apply yet
        check_update(first, second, [sign_session(second, KEYS[1])])
    skipped = load_session(_document(revision=3, predecessor=first.digest()))
    forked = load_session(_document(revision=2, predecessor="00" * 32))
    for bad in (skipped, forked):
        with pytest.raises(SessionUpdateError, match="does not follow"):
            check_update(first, bad, [sign_session(bad, KEYS[0]), sign_session(bad, KEYS[1])])
    with pytest.raises(SessionUpdateError, match="first revision is 1"):
        check_update(None, second, [sign_session(second, KEYS[0]), sign_session(second, KEYS[1])])
