"""The request-size limit is one setting: refused in a line naming it (client first, gateway if the client
was told more), and with the setting raised on both sides an 80 MB input is served."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from sealedml import zoo
from sealedml.client.gateway import InferenceClient
from sealedml.errors import Error, InputError
from tests.conftest import Stack, _make_stack

pytestmark = pytest.mark.slow

#: 80 MB of float32 rows for the toy model (x: [N, 4]).
ROWS = 80 * 10**6 // 16


def _inputs() -> dict[str, np.ndarray]:
    x = np.ones((ROWS, 4), np.float32)
    return {"x": x, "idx": np.zeros(1, np.int64)}


@pytest.fixture(scope="module")
def raised_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _make_stack(tmp_path_factory.mktemp("limits"), platform_extra=["--max-request", "128MB"])


def _publish(stack: Stack, model_id: str):  # type: ignore[no-untyped-def]
    owner, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    stack.publish(owner_ks, zoo.toy_multi_io(), model_id, users=[(user, user_ks)])
    return user


def test_a_request_above_the_default_limit_names_the_setting(stack, unique_id):
    model_id = unique_id("limit")
    user = _publish(stack, model_id)
    with pytest.raises(InputError) as caught:
        stack.infer_client(user).infer(model_id, _inputs())  # refused here, before the upload
    message = caught.value.message
    assert "above this client's limit of" in message and "infer --max-request" in message
    assert "SEALEDML_MAX_REQUEST" in message
    client = InferenceClient(stack.gateway.url, user, max_request=200 * 10**6)  # told more than the gateway allows
    try:
        with pytest.raises(Error) as refused:
            client.infer(model_id, _inputs())
    finally:
        client.close()
    assert refused.value.code == "too_large" and "platform serve --max-request" in refused.value.message


def test_with_the_setting_raised_an_80_mb_input_is_served(raised_stack, unique_id):
    model_id = unique_id("big")
    user = _publish(raised_stack, model_id)
    client = InferenceClient(raised_stack.gateway.url, user, max_request=128 * 10**6)
    try:
        outputs = client.infer(model_id, _inputs())
    finally:
        client.close()
    assert outputs["y"].shape == (ROWS, 3) and outputs["idx_plus_one"].tolist() == [1]
