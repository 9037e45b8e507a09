"""KeyService state survives kill -9: every acknowledged write is there after restart."""

from __future__ import annotations

import numpy as np
import pytest

from sealedml.attestation.measurement import measurement_for
from sealedml.client.gateway import InferenceClient
from sealedml.client.identity import Identity
from sealedml.client.keyservice import KeyServiceClient
from sealedml.client.owner import publish_model
from sealedml.keyservice.store import SQLiteKeyStore
from sealedml.storage.modelstore import LocalModelStore
from tests.conftest import start_keyservice, start_platform

pytestmark = pytest.mark.slow


def test_acknowledged_state_survives_kill9(tmp_path, toy_model):
    runtime = measurement_for("runtime", {"tee": "simulated"})
    data_dir = tmp_path / "ks-data"
    ks = start_keyservice(tmp_path, data_dir=data_dir)
    owner = Identity.generate()
    users = [Identity.generate() for _ in range(8)]
    store = LocalModelStore(tmp_path / "store")
    with KeyServiceClient(ks.url, owner) as o:
        o.register()
        publish_model(toy_model, model_id="durable", keyservice=o, store=store)
        o.allow_runtime("durable", runtime)
        for user in users:
            with KeyServiceClient(ks.url, user) as u:
                u.register()
                o.grant("durable", user.principal_id)
                u.enable("durable", [runtime])
    ks.kill9()  # right after the last acknowledged call: no graceful shutdown

    ks2 = start_keyservice(tmp_path, data_dir=data_dir)
    gw = start_platform(tmp_path, ks2.url)
    try:
        for user in users:
            with KeyServiceClient(ks2.url, user) as u:
                info = u.model_info("durable")
                assert info.granted and info.consented and info.current_version == 1
        with InferenceClient(gw.url, users[-1]) as infer:
            out = infer.infer("durable", {"x": np.ones((1, 4), np.float32), "idx": np.array([7], np.int64)})
        assert int(out["idx_plus_one"][0]) == 8
    finally:
        gw.stop()
        ks2.stop()
    store_db = SQLiteKeyStore(data_dir / "keyservice.sqlite3")
    try:
        # 1 owner + 8 users registered, 1 key, 1 runtime, 8 grants, 8 consents, release(s): chain intact
        assert store_db.verify_audit_chain() >= 27
    finally:
        store_db.close()


def test_data_dir_of_another_build_is_refused(tmp_path):
    """The master key is sealed to the KeyService measurement: another build cannot unseal it."""
    from sealedml.attestation.sealing import SimulatedSealer
    from sealedml.attestation.simulated import SimulatedPlatform
    from sealedml.errors import StoreError
    from sealedml.keyservice.service import load_master_key

    platform = SimulatedPlatform.load()
    load_master_key(tmp_path, SimulatedSealer(platform, "aa" * 48))
    with pytest.raises(StoreError, match="another build"):
        load_master_key(tmp_path, SimulatedSealer(platform, "bb" * 48))
