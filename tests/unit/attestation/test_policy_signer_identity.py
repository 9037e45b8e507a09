"""SGX signer identity: policies that name an enclave by MRSIGNER + ISV product id + minimum SVN.

That is the form a worker uses to trust the KeyService (and the KeyService's
operator policy to name workers) without either enclave's MRENCLAVE containing
the other's. Every test that accepts something has a twin that breaks exactly
one value and is refused; intersections must never widen either side.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest

from sealedml.attestation.base import Claims, TeeType
from sealedml.attestation.policy import Policy, TeeRule
from sealedml.attestation.policy_document import describe_policy, load_policy
from sealedml.errors import PolicyError
from sealedml.keyservice.access import PairState, decide_pair
from sealedml.keyservice.store import ConsentRecord, ModelRecord, RuntimeId

from ._support import MRENCLAVE, MRSIGNER, SGX_TIME

BY_SIGNER = f"""
version: 1
tcb_statuses: [UpToDate, ConfigurationAndSWHardeningNeeded]
sgx:
  mrsigner: ["{MRSIGNER}"]
  isv_prod_id: [0]
  min_isv_svn: 0
"""

OTHER_ENCLAVE = "ee" * 32


def _sgx_claims(measurement: str = OTHER_ENCLAVE, *, signer: str = MRSIGNER, prod_id: int = 0, svn: int = 0) -> Claims:
    return Claims(
        tee=TeeType.SGX,
        measurement=measurement,
        report_data=bytes(64),
        debug=False,
        signer=signer,
        tcb_status="UpToDate",
        details=MappingProxyType({"isv_prod_id": prod_id, "isv_svn": svn}),
    )


def test_signer_identity_accepts_the_real_quote_whatever_its_mrenclave(sgx_vector_claims: Claims) -> None:
    claims = sgx_vector_claims
    policy = load_policy(BY_SIGNER)
    policy.verify(claims, now=SGX_TIME)
    policy.verify(replace(claims, measurement=OTHER_ENCLAVE), now=SGX_TIME)  # a rebuilt release
    summary = describe_policy(policy)
    assert summary["denies_everything"] is False and summary["tee_rules"]["sgx"]["by_signer"] is True
    assert (
        describe_policy(load_policy(f"version: 1\nsgx: {{mrenclave: ['{MRENCLAVE}']}}"))["tee_rules"]["sgx"][
            "by_signer"
        ]
        is False
    )
    with pytest.raises(PolicyError, match="signer"):
        load_policy(BY_SIGNER.replace(MRSIGNER, "00" * 32)).verify(claims, now=SGX_TIME)
    with pytest.raises(PolicyError, match="isv_prod_id 0 not allowed"):
        load_policy(BY_SIGNER.replace("isv_prod_id: [0]", "isv_prod_id: [1]")).verify(claims, now=SGX_TIME)
    with pytest.raises(PolicyError, match="isv_svn 0 below minimum 1"):
        load_policy(BY_SIGNER.replace("min_isv_svn: 0", "min_isv_svn: 1")).verify(claims, now=SGX_TIME)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        (_sgx_claims(signer="00" * 32), "signer"),
        (_sgx_claims(prod_id=1), "isv_prod_id 1 not allowed"),  # another product of the same signer
        (_sgx_claims(svn=0), "below minimum"),  # a release older than the minimum SVN
        (replace(_sgx_claims(), debug=True), "debug"),
        (replace(_sgx_claims(), tee=TeeType.SIMULATED), "TEE type"),
        (replace(_sgx_claims(), tcb_status="OutOfDate"), "TCB status"),
    ],
)
def test_signer_identity_refuses_each_broken_value(claims: Claims, reason: str) -> None:
    policy = load_policy(BY_SIGNER.replace("min_isv_svn: 0", "min_isv_svn: 1"))
    policy.verify(_sgx_claims(svn=1))
    with pytest.raises(PolicyError, match=reason):
        policy.verify(claims)


@pytest.mark.parametrize(
    "section",
    [
        f'  mrsigner: ["{MRSIGNER}"]\n  isv_prod_id: [0]\n',  # no minimum SVN: any old release
        f'  mrsigner: ["{MRSIGNER}"]\n  min_isv_svn: 1\n',  # no product id: the signer's other enclaves
        "  isv_prod_id: [0]\n  min_isv_svn: 1\n",  # no signer: anyone's enclave
        "  allow_debug: false\n",
    ],
)
def test_sgx_section_without_mrenclave_needs_signer_product_and_svn(section: str) -> None:
    with pytest.raises(PolicyError, match="mrenclave, or name the enclave by signer"):
        load_policy(f"version: 1\nsgx:\n{section}")


def test_intersection_with_a_measurement_list_keeps_that_list() -> None:
    """Signer identity ∩ a list of MRENCLAVEs: exactly those MRENCLAVEs, and only from that signer."""
    by_signer = load_policy(BY_SIGNER)
    listed = Policy(
        measurements=frozenset({MRENCLAVE}),
        tee_types=frozenset({TeeType.SGX}),
        tee_rules={TeeType.SGX: TeeRule(TeeType.SGX, measurements=frozenset({MRENCLAVE}))},
    )
    for both in (by_signer.intersect(listed), listed.intersect(by_signer)):
        both.verify(_sgx_claims(MRENCLAVE))
        with pytest.raises(PolicyError, match="measurement"):
            both.verify(_sgx_claims(OTHER_ENCLAVE))
        with pytest.raises(PolicyError, match="signer"):
            both.verify(_sgx_claims(MRENCLAVE, signer="00" * 32))
    flat = Policy.for_measurements([MRENCLAVE])  # no rules at all: its flat list still bounds the result
    with pytest.raises(PolicyError, match="measurement"):
        by_signer.intersect(flat).verify(_sgx_claims(OTHER_ENCLAVE))
    by_signer.intersect(flat).verify(_sgx_claims(MRENCLAVE))


def test_disjoint_signers_or_measurements_accept_nothing() -> None:
    by_signer = load_policy(BY_SIGNER)
    other_signer = load_policy(BY_SIGNER.replace(MRSIGNER, "11" * 32))
    both = by_signer.intersect(other_signer)
    assert both.denies_everything
    with pytest.raises(PolicyError):
        both.verify(_sgx_claims(signer=MRSIGNER))
    with pytest.raises(PolicyError):
        both.verify(_sgx_claims(signer="11" * 32))
    # A rule listing one MRENCLAVE ∩ a rule listing another (both with the signer) is no signer identity.
    one = TeeRule(TeeType.SGX, measurements=frozenset({MRENCLAVE}), signers=frozenset({MRSIGNER}))
    two = TeeRule(TeeType.SGX, measurements=frozenset({OTHER_ENCLAVE}))
    merged = one.intersect(two)
    assert not merged.identifies_by_signer
    with pytest.raises(PolicyError, match="no measurement or signer in common"):
        merged.verify(_sgx_claims(MRENCLAVE), policy_allows_debug=False)
    flat_a = Policy(measurements=frozenset({MRENCLAVE}), signers=frozenset({MRSIGNER}))
    flat_b = Policy(measurements=frozenset({MRENCLAVE}), signers=frozenset({"11" * 32}))
    with pytest.raises(PolicyError):
        flat_a.intersect(flat_b).verify(_sgx_claims(MRENCLAVE))


def test_operator_policy_by_signer_still_needs_owner_and_user_to_name_the_worker() -> None:
    """The KeyService's ``--policy`` naming workers by signer narrows the pair's list; it never replaces it."""
    base = load_policy(BY_SIGNER)
    allowed = frozenset({RuntimeId(TeeType.SGX, MRENCLAVE)})
    state = PairState(
        model_id="m",
        user_id="u",
        model=ModelRecord("m", "owner", 1),
        allowed_runtimes=allowed,
        granted=True,
        consent=ConsentRecord("m", "u", b"wrapped", allowed),
    )
    assert decide_pair(state, _sgx_claims(MRENCLAVE), base) is None
    assert "signer" in (decide_pair(state, _sgx_claims(MRENCLAVE, signer="00" * 32), base) or "")
    assert "owner does not allow" in (decide_pair(state, _sgx_claims(OTHER_ENCLAVE), base) or "")
