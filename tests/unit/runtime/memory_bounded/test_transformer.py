"""Memory-bounded execution of a transformer: MatMul weights split along their reduction rows, the
word-embedding table split into row blocks, and sealed shape tensors read before planning."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml.envelope.model_container import SealedModelReader, open_model, seal_model
from sealedml.errors import InputError
from sealedml.runtime.engine import LoadedModel
from sealedml.runtime.memory_bounded import StreamingModel, plan, planning_graph
from sealedml.zoo.minilm import MiniLMConfig, minilm, sample_inputs

KEY = bytes(range(32))
#: A MiniLM of the same graph, small enough for a unit test: a 768 kB word table, 128 kB FFN weights.
SMALL = MiniLMConfig(layers=2, hidden=64, heads=4, ffn=512, sequence=16, vocab=3000, positions=32)
#: Below the word table and the FFN weights: both must be split.
BUDGET = 150_000


def _whole(sealed: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return LoadedModel(open_model(sealed, KEY), model_id="m", version=1).run(feeds).outputs


def _max_diff(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    assert list(got) == list(expected)
    return max(float(np.max(np.abs(got[name] - value))) for name, value in expected.items())


@pytest.fixture(scope="module")
def small_minilm() -> bytes:
    return seal_model(minilm(3, SMALL), model_id="minilm", model_version=1, model_key=KEY, chunk_size=4096)


def _ffn(seed: int = 0) -> onnx.ModelProto:
    """Token activations ``[N, 8, 48]`` through a feed-forward block: MatMul 48→192, Relu, MatMul 192→48, bias."""
    rng = np.random.default_rng(seed)
    weights = {
        "up": (rng.standard_normal((48, 192)) / 7).astype(np.float32),
        "down": (rng.standard_normal((192, 48)) / 14).astype(np.float32),
        "bias": rng.standard_normal(48).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "up"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "down"], ["d"], name="down"),
        helper.make_node("Add", ["d", "bias"], ["y"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 48])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("optimize", [True, False])
def test_matmul_split_along_reduction_rows_equals_the_unsplit_graph(optimize: bool) -> None:
    sealed = seal_model(_ffn(), model_id="ffn", model_version=1, model_key=KEY, chunk_size=4096)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 8, 48)).astype(np.float32)}
    budget = 40_000  # each 36.9 kB weight must be split
    with StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=budget, optimize=optimize) as model:
        assert {name: strategy for name, (strategy, _) in model.plan.splits.items()} == {
            "up": "matmul-k-rows",
            "down": "matmul-k-rows",
        }
        got = model.run(feeds).outputs
        assert _max_diff(got, _whole(sealed, feeds)) <= 1e-5
        assert model.last_peak_bytes is not None and model.last_peak_bytes <= budget


@pytest.mark.parametrize(("optimize", "prefetch"), [(True, True), (True, False), (False, True)])
def test_small_minilm_streams_within_its_budget_and_matches_the_whole_model(
    small_minilm: bytes, optimize: bool, prefetch: bool
) -> None:
    feeds = sample_inputs(1, seed=1, config=SMALL, kept=11)
    expected = _whole(small_minilm, feeds)
    with StreamingModel(
        SealedModelReader(small_minilm, KEY), budget_bytes=BUDGET, prefetch=prefetch, optimize=optimize
    ) as model:
        strategies = {name: strategy for name, (strategy, _) in model.plan.splits.items()}
        assert strategies["embeddings.words"] == "gather-rows"
        assert strategies["layer0.ffn.up.matmul"] == strategies["layer1.ffn.down.matmul"] == "matmul-k-rows"
        assert not model.plan.estimated  # every activation's size is known, none guessed
        assert not model.load_stats.fallbacks
        for _ in range(2):
            got = model.run(feeds).outputs
            assert _max_diff(got, expected) <= 1e-4
            assert model.last_peak_bytes is not None and model.last_peak_bytes <= model.peak_bound_bytes <= BUDGET


def test_out_of_range_token_is_refused_as_by_the_whole_model(small_minilm: bytes) -> None:
    feeds = sample_inputs(1, config=SMALL)
    feeds["input_ids"][0, 3] = SMALL.vocab
    with pytest.raises(InputError):
        _whole(small_minilm, feeds)
    with StreamingModel(SealedModelReader(small_minilm, KEY), budget_bytes=BUDGET) as model:
        assert model.plan.splits["embeddings.words"][1] > 1
        with pytest.raises(InputError):
            model.run(feeds)


def test_sealed_shape_tensors_are_read_so_no_activation_size_is_guessed(small_minilm: bytes) -> None:
    reader = SealedModelReader(small_minilm, KEY)
    sizes = {entry.name: entry.length for entry in reader.manifest.tensors}
    # The Reshape targets and Unsqueeze axes are sealed: without their values, inference stops there.
    blind = plan(reader.graph(), sizes, 1 << 30)
    assert "layer0.query.split" in blind.estimated and "mask.heads" in blind.estimated
    graph = planning_graph(reader)
    exact = plan(graph, sizes, 1 << 30)
    assert exact.estimated == ()
    assert exact.infos["layer0.scores.masked"].nbytes == SMALL.heads * SMALL.sequence**2 * 4
    inline = {init.name for init in graph.graph.initializer if init.data_location != TensorProto.EXTERNAL}
    assert inline == {"layer0.split_shape", "layer0.merge_shape", "layer1.split_shape", "layer1.merge_shape"} | {
        "embeddings.position_ids",
        "mask.axes",
        "pool.axes",
        "pool.seq",
        "pool.seq2",
    }
    # They stay sealed weights of the plan, decrypted per segment like the others.
    assert "layer0.split_shape" in {w.tensor for segment in exact.segments for w in segment.weights}
