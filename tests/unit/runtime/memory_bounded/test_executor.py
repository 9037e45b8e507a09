"""The memory-bounded executor (:mod:`sealedml.runtime.memory_bounded.executor`): same outputs as the
whole-model path, tracked peak within the budget, prefetch on or off."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml import zoo
from sealedml.envelope.model_container import SealedModelReader, open_model, seal_model
from sealedml.errors import ConfigurationError, InputError
from sealedml.runtime.engine import LoadedModel
from sealedml.runtime.memory_bounded import BudgetError, MemoryTracker, StreamingModel, decrypt_reserve, plan
from sealedml.runtime.memory_bounded.accounting import process_memory

KEY = bytes(range(32))
F32 = TensorProto.FLOAT


def mlp(seed: int = 0) -> onnx.ModelProto:
    """A three-layer MLP: MatMul+Add (weights (64, 512), (512,)), Relu, Gemm(transB) 512→256, Relu, MatMul 256→10."""
    rng = np.random.default_rng(seed)
    weights = {
        "fc1.weight": rng.standard_normal((64, 512)).astype(np.float32) * 0.1,
        "fc1.bias": rng.standard_normal(512).astype(np.float32),
        "fc2.weight": rng.standard_normal((256, 512)).astype(np.float32) * 0.05,
        "fc2.bias": rng.standard_normal(256).astype(np.float32),
        "fc3.weight": rng.standard_normal((256, 10)).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"], name="fc1.add"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("Gemm", ["h2", "fc2.weight", "fc2.bias"], ["h3"], name="fc2", transB=1),
        helper.make_node("Relu", ["h3"], ["h4"], name="relu2"),
        helper.make_node("MatMul", ["h4", "fc3.weight"], ["logits"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", F32, ["N", 64])],
        [helper.make_tensor_value_info("logits", F32, ["N", 10])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def whole_outputs(sealed: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    whole = LoadedModel(open_model(sealed, KEY), model_id="m", version=1)
    return whole.run(feeds).outputs


def assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], tol: float = 1e-4) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        if value.dtype.kind in "iub":
            np.testing.assert_array_equal(got[name], value)
        else:
            assert float(np.max(np.abs(got[name] - value))) <= tol, name


@pytest.fixture(scope="module")
def mlp_sealed() -> bytes:
    return seal_model(mlp(), model_id="mlp", model_version=2, model_key=KEY, chunk_size=4096)


@pytest.fixture(scope="module")
def mlp_feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}


# -- small graphs --------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [150_000, 300_000, 2_000_000])
@pytest.mark.parametrize("prefetch", [True, False])
def test_mlp_streaming_matches_whole_model_within_budget(
    mlp_sealed: bytes, mlp_feeds: dict[str, np.ndarray], budget: int, prefetch: bool
) -> None:
    expected = whole_outputs(mlp_sealed, mlp_feeds)
    with StreamingModel(SealedModelReader(mlp_sealed, KEY), budget_bytes=budget, prefetch=prefetch) as model:
        for _ in range(2):  # the second run must not see anything left by the first
            got = model.run(mlp_feeds).outputs
            assert_close(got, expected)
            assert model.last_peak_bytes is not None and model.last_peak_bytes <= budget
        assert model.last_peak_bytes <= model.peak_bound_bytes <= budget
        if not model.load_stats.optimized_segments:
            assert model.peak_bound_bytes <= model.plan.peak_bytes
        stats = model.last_stats
        assert stats is not None and len(stats.segments) == len(model.plan.segments)
        assert stats.budget_bytes == budget
        assert stats.compute_s > 0 and stats.decrypt_s > 0 and stats.total_s >= stats.compute_s
        # Optimized segments decrypt their (possibly padded) optimized weights instead.
        assert sum(s.weight_bytes for s in stats.segments) == model.load_stats.weight_bytes
        if budget == 150_000:
            assert model.plan.splits  # fc1 (128 KiB) must be split at this budget


def test_tight_budget_splits_and_still_matches(mlp_sealed: bytes, mlp_feeds: dict[str, np.ndarray]) -> None:
    expected = whole_outputs(mlp_sealed, mlp_feeds)
    model = StreamingModel(SealedModelReader(mlp_sealed, KEY), budget_bytes=80_000, prefetch=True)
    strategies = {strategy for strategy, _ in model.plan.splits.values()}
    assert strategies == {"matmul-k-rows", "gemm-out-columns"}
    assert_close(model.run(mlp_feeds).outputs, expected)
    assert model.last_peak_bytes is not None and model.last_peak_bytes <= 80_000
    model.close()


def test_closed_model_still_runs_without_prefetch(mlp_sealed: bytes, mlp_feeds: dict[str, np.ndarray]) -> None:
    model = StreamingModel(SealedModelReader(mlp_sealed, KEY), budget_bytes=300_000, prefetch=True)
    first = model.run(mlp_feeds).outputs
    model.close()
    model.close()
    assert_close(model.run(mlp_feeds).outputs, first, tol=0.0)
    assert all(s.wait_s == 0.0 for s in model.last_stats.segments)


def test_toy_model_with_two_inputs_and_integer_output(toy_model: onnx.ModelProto) -> None:
    sealed = seal_model(toy_model, model_id="toy", model_version=1, model_key=KEY)
    feeds = {
        "x": np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32),
        "idx": np.arange(3, dtype=np.int64),
    }
    model = StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=1_000_000, batch=3)
    assert [s.name for s in model.inputs] == ["x", "idx"]
    assert [s.dtype for s in model.inputs] == [np.dtype(np.float32), np.dtype(np.int64)]
    assert model.output_names == ["y", "idx_plus_one"]
    assert (model.model_id, model.version) == ("toy", 1)
    assert_close(model.run(model.bind_inputs(feeds, positional=False)).outputs, whole_outputs(sealed, feeds))
    positional = model.bind_inputs({"0": feeds["x"], "1": feeds["idx"]}, positional=True)
    assert_close(model.run(positional).outputs, whole_outputs(sealed, feeds))
    model.close()


def test_digits_classifier_streams_its_weights() -> None:
    dm = zoo.digits()
    sealed = seal_model(dm.model, model_id="digits", model_version=1, model_key=KEY)
    feeds = {"input": np.ascontiguousarray(dm.x_test[:16])}
    model = StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=1_000_000, batch=16, prefetch=False)
    assert_close(model.run(feeds).outputs, whole_outputs(sealed, feeds))
    # Its parameters are initializers (scaler mean/scale, weight, bias): decrypted per run.
    assert model.plan.weight_bytes == (64 + 64 + 64 * 10 + 10) * 4


@pytest.mark.parametrize("optimize", [True, False])
def test_reader_factory_opens_a_reader_per_run_that_needs_one(
    tmp_path: Path, mlp_sealed: bytes, mlp_feeds: dict[str, np.ndarray], optimize: bool
) -> None:
    path = tmp_path / "mlp.sealed"
    path.write_bytes(mlp_sealed)
    opened: list[SealedModelReader] = []

    def factory() -> SealedModelReader:
        reader = SealedModelReader(path, KEY)
        opened.append(reader)
        return reader

    model = StreamingModel(factory, budget_bytes=300_000, optimize=optimize)
    model.run(mlp_feeds)
    model.run(mlp_feeds)
    # Sealed segments read the container per run; optimized ones read only the spill file.
    assert len(opened) == (1 if optimize else 3)
    assert all(r._file is None for r in opened)  # each was closed after use
    assert_close(model.run(mlp_feeds).outputs, whole_outputs(mlp_sealed, mlp_feeds))
    model.close()


def test_concurrent_runs_share_one_reader(mlp_sealed: bytes) -> None:
    model = StreamingModel(SealedModelReader(mlp_sealed, KEY), budget_bytes=150_000, batch=2)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(4)]
    expected = [whole_outputs(mlp_sealed, f) for f in feeds]
    results: dict[int, list[dict[str, np.ndarray]]] = {i: [] for i in range(4)}
    peaks: list[int | None] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(3):  # concurrent runs race for the one warm head (and its arena)
                result = model.run(feeds[i])
                results[i].append(result.outputs)
                peaks.append(result.peak_bytes)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        assert len(results[i]) == 3
        for outputs in results[i]:
            assert_close(outputs, expected[i])
    assert len(peaks) == 12 and all(p is not None and p <= 150_000 for p in peaks)
    model.close()


def test_batch_larger_than_planned_is_refused(mlp_sealed: bytes) -> None:
    model = StreamingModel(SealedModelReader(mlp_sealed, KEY), budget_bytes=300_000, batch=2, prefetch=False)
    rng = np.random.default_rng(4)
    model.run({"x": rng.standard_normal((1, 64)).astype(np.float32)})  # smaller batches are fine
    with pytest.raises(InputError, match="memory plan"):
        model.run({"x": rng.standard_normal((3, 64)).astype(np.float32)})
    with pytest.raises(InputError, match="memory plan"):
        model.bind_inputs({"x": rng.standard_normal((3, 64)).astype(np.float32)}, positional=False)
    with pytest.raises(InputError, match="float32"):
        model.bind_inputs({"x": np.zeros((1, 64), dtype=np.float64)}, positional=False)
    with pytest.raises(InputError, match="missing"):
        model.bind_inputs({}, positional=False)
    with pytest.raises(InputError, match="rejected"):
        model.run({"x": np.zeros((1, 63), dtype=np.float32)})


def test_construction_errors(mlp_sealed: bytes) -> None:
    reader = SealedModelReader(mlp_sealed, KEY)
    with pytest.raises(BudgetError, match="smallest feasible budget"):
        StreamingModel(reader, budget_bytes=5_000)
    with pytest.raises(ConfigurationError):
        StreamingModel(reader)  # neither budget nor plan
    sizes = {e.name: e.length for e in reader.manifest.tensors}
    no_prefetch = plan(reader.graph(), sizes, 300_000, prefetch=False, reserve_bytes=decrypt_reserve(4096))
    without_reserve = plan(reader.graph(), sizes, 300_000, prefetch=False)
    with pytest.raises(ConfigurationError, match="reserve"):
        StreamingModel(reader, plan=without_reserve, prefetch=False)
    model = StreamingModel(reader, plan=no_prefetch, prefetch=False)
    assert model.plan is no_prefetch
    assert model.nbytes > 0 and model.nbytes < len(mlp_sealed)  # structure only, no weights


def test_memory_tracker_counts_peak_and_refuses_underflow() -> None:
    tracker = MemoryTracker()
    tracker.add(10, "weights")
    with tracker.hold(5):
        assert tracker.current == 15
    tracker.release(10, "weights")
    snap = tracker.snapshot()
    assert (snap.current, snap.peak) == (0, 15)
    assert snap.peak_breakdown["weights"] == 10 and snap.peak_breakdown["scratch"] == 5
    with pytest.raises(ValueError):
        tracker.release(1, "weights")
    with pytest.raises(ValueError):
        tracker.add(1, "nonsense")
    mem = process_memory()
    assert mem.rss_bytes > 0 and mem.hwm_bytes >= mem.rss_bytes


# -- MobileNetV2 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet() -> tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]]:
    sealed = seal_model(zoo.mobilenetv2(), model_id="mobilenetv2", model_version=1, model_key=KEY)
    feeds = {"input": np.random.default_rng(5).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    return sealed, feeds, whole_outputs(sealed, feeds)


@pytest.mark.parametrize("budget", [12_000_000, 16_000_000, 32_000_000])
def test_mobilenet_streaming_matches_whole_model(
    mobilenet: tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]], budget: int
) -> None:
    sealed, feeds, expected = mobilenet
    reader = SealedModelReader(sealed, KEY)
    outputs: list[dict[str, np.ndarray]] = []
    for prefetch, optimize in ((True, True), (False, True), (True, False)):
        with StreamingModel(reader, budget_bytes=budget, prefetch=prefetch, threads=2, optimize=optimize) as model:
            got = model.run(feeds).outputs
            assert_close(got, expected)
            assert model.last_peak_bytes is not None and model.last_peak_bytes <= budget
            if optimize:
                assert set(model.segment_modes) == {"optimized"}
                assert model.load_stats.nchwc_nodes > 0
            outputs.append(got)
    # The plans may cut in different places (so ORT fuses differently): equal within tolerance.
    assert_close(outputs[0], outputs[1], tol=1e-5)
    assert_close(outputs[0], outputs[2], tol=1e-5)


@pytest.mark.slow
def test_resnet50_at_32mb_matches_whole_model() -> None:
    sealed = seal_model(zoo.resnet50(), model_id="resnet50", model_version=1, model_key=KEY)
    feeds = {"input": np.random.default_rng(6).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    expected = whole_outputs(sealed, feeds)
    with StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=32_000_000, threads=2) as model:
        assert set(model.segment_modes) == {"optimized"}
        assert_close(model.run(feeds).outputs, expected)
        assert model.last_peak_bytes is not None and model.last_peak_bytes <= 32_000_000
        assert model.last_peak_bytes <= model.plan.budget_bytes


# -- prefetch within the budget's headroom ------------------------------------------------------


@pytest.mark.parametrize("optimize", [True, False])
def test_prefetch_decrypts_ahead_only_what_the_budget_leaves(
    mlp_sealed: bytes, mlp_feeds: dict[str, np.ndarray], optimize: bool
) -> None:
    expected = whole_outputs(mlp_sealed, mlp_feeds)
    budget = 300_000
    with StreamingModel(
        SealedModelReader(mlp_sealed, KEY), budget_bytes=budget, prefetch=True, optimize=optimize
    ) as model:
        assert not model.plan.prefetch  # its own plan: the fewest segments, each filling the budget
        weights = [state.weight_bytes for state in model.segment_states]
        ahead = model.prefetch_ahead_bytes
        assert len(ahead) == len(weights) and ahead[-1] == 0
        pairs = list(zip(ahead, weights[1:], strict=False))
        if optimize:
            # Chunks clear of the running segment's bytes, within what the budget leaves.
            assert all(0 <= a <= w for a, w in pairs)
            assert any(0 < a < w for a, w in pairs)  # partly ahead
        else:
            assert all(a in (0, w) for a, w in pairs)  # container reads are not split
        for _ in range(3):
            assert_close(model.run(mlp_feeds).outputs, expected)
            assert model.last_peak_bytes is not None and model.last_peak_bytes <= budget
        assert model.peak_bound_bytes <= budget


def test_a_plan_made_for_prefetch_prefetches_whole_segments(
    mlp_sealed: bytes, mlp_feeds: dict[str, np.ndarray]
) -> None:
    reader = SealedModelReader(mlp_sealed, KEY)
    sizes = {e.name: e.length for e in reader.manifest.tensors}
    paired = plan(reader.graph(), sizes, 300_000, prefetch=True, reserve_bytes=decrypt_reserve(4096))
    with StreamingModel(reader, plan=paired, prefetch=True, optimize=False) as model:
        weights = [s.weight_bytes for s in paired.segments]
        assert model.prefetch_ahead_bytes == (*weights[1:], 0)
        assert_close(model.run(mlp_feeds).outputs, whole_outputs(mlp_sealed, mlp_feeds))
        assert model.last_peak_bytes is not None and model.last_peak_bytes <= 300_000
    with StreamingModel(reader, plan=paired, prefetch=False, optimize=False) as serial:
        assert set(serial.prefetch_ahead_bytes) == {0}


@pytest.mark.parametrize("prefetch", [True, False])
def test_no_plaintext_weight_stays_in_the_arena(
    mlp_sealed: bytes, mlp_feeds: dict[str, np.ndarray], prefetch: bool
) -> None:
    with StreamingModel(SealedModelReader(mlp_sealed, KEY), budget_bytes=150_000, prefetch=prefetch) as model:
        assert model.load_stats.optimized_segments > 0
        expected = whole_outputs(mlp_sealed, mlp_feeds)
        for _ in range(3):  # back to back: a run may borrow the arena before its background wipe ran
            assert_close(model.run(mlp_feeds).outputs, expected)
        pool = model.arena_pool
    # With prefetch the wipe runs on a prefetch thread after the run; close() waits for it.
    assert pool.dirty == 0
    assert pool.idle >= 1
    for arena in pool.idle_arenas:
        assert arena.marked == 0
        assert arena.nonzero_bytes() == 0, "plaintext left in the weight arena after the run"


def test_between_requests_the_arena_holds_the_first_segment_only(
    monkeypatch: pytest.MonkeyPatch, mlp_sealed: bytes, mlp_feeds: dict[str, np.ndarray]
) -> None:
    """The warm head: after a run the next run's first segment is decrypted into the arena the
    run used, after the rest of it is zeroed; the next run adopts that arena."""
    from sealedml.runtime.memory_bounded import arena as arena_module

    borrowed: list[arena_module.WeightArena] = []
    borrow = arena_module.ArenaPool.borrow

    def spy_borrow(self: arena_module.ArenaPool, capacity: int) -> arena_module.WeightArena:
        borrowed.append(borrow(self, capacity))
        return borrowed[-1]

    monkeypatch.setattr(arena_module.ArenaPool, "borrow", spy_borrow)
    expected = whole_outputs(mlp_sealed, mlp_feeds)
    with StreamingModel(SealedModelReader(mlp_sealed, KEY), budget_bytes=150_000, prefetch=True) as model:
        assert model.warm_first_segment and len(model.plan.segments) >= 2
        head = model.segment_states[0].entry
        assert head is not None
        for _ in range(3):
            assert_close(model.run(mlp_feeds).outputs, expected)
            assert model.last_peak_bytes is not None and model.last_peak_bytes <= 150_000
            model.settle()
            assert len(borrowed) == 1  # every later run adopted the arena the run before it used
            arena = borrowed[0]
            # Marked: the first segment's bytes and nothing else; the stale rest is zero.
            assert arena.marked == head.nbytes
            assert 0 < arena.nonzero_bytes() <= head.nbytes
    assert arena.marked == 0 and arena.nonzero_bytes() == 0  # close() wiped it

    # Without the warm head every run borrows a wiped arena.
    borrowed.clear()
    with StreamingModel(
        SealedModelReader(mlp_sealed, KEY), budget_bytes=150_000, prefetch=True, warm_first_segment=False
    ) as cold:
        assert not cold.warm_first_segment
        graphs = sum(state.graph_bytes for state in cold.segment_states)
        assert cold.nbytes == graphs
        for _ in range(2):
            assert_close(cold.run(mlp_feeds).outputs, expected)
        assert len(borrowed) == 2


@pytest.mark.parametrize(("budget", "prefetch"), [(150_000, True), (300_000, True), (150_000, False)])
def test_every_plaintext_byte_in_the_arena_is_counted(
    monkeypatch: pytest.MonkeyPatch,
    mlp_sealed: bytes,
    mlp_feeds: dict[str, np.ndarray],
    budget: int,
    prefetch: bool,
) -> None:
    """Weights a segment has finished with still sit in memory until overwritten or zeroed:
    while any segment computes, the arena's non-zero bytes must not exceed what the tracker
    counts as weights (which stays within the budget)."""
    from sealedml.runtime.memory_bounded import arena as arena_module
    from sealedml.runtime.memory_bounded import executor as executor_module

    borrowed: list[arena_module.WeightArena] = []
    borrow = arena_module.ArenaPool.borrow

    def spy_borrow(self: arena_module.ArenaPool, capacity: int) -> arena_module.WeightArena:
        got = borrow(self, capacity)
        borrowed.append(got)
        return got

    checks: list[tuple[int, int]] = []
    compute = executor_module.StreamingModel._compute

    def spy_compute(self: StreamingModel, segment, session, env, loaded, tracker):  # type: ignore[no-untyped-def]
        checks.append((borrowed[-1].nonzero_bytes(), tracker.held("weights")))
        return compute(self, segment, session, env, loaded, tracker)

    monkeypatch.setattr(arena_module.ArenaPool, "borrow", spy_borrow)
    monkeypatch.setattr(executor_module.StreamingModel, "_compute", spy_compute)
    with StreamingModel(SealedModelReader(mlp_sealed, KEY), budget_bytes=budget, prefetch=prefetch) as model:
        assert set(model.segment_modes) == {"optimized"}
        expected = whole_outputs(mlp_sealed, mlp_feeds)
        for _ in range(2):
            assert_close(model.run(mlp_feeds).outputs, expected)
            assert model.last_peak_bytes is not None and model.last_peak_bytes <= budget
    assert len(checks) == 2 * len(model.plan.segments)
    for plaintext, counted in checks:
        assert plaintext <= counted <= budget
    # Stale weights are really there: after the first segment the arena holds more than the
    # running segment alone (which is why they must be counted).
    assert any(plaintext > max(s.weight_bytes for s in model.segment_states) // 2 for plaintext, _ in checks[1:])


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_sealed_path_zeroes_the_weights_it_decrypted(
    monkeypatch: pytest.MonkeyPatch, mlp_sealed: bytes, mlp_feeds: dict[str, np.ndarray], prefetch: bool
) -> None:
    """Freed memory is not cleared: a sealed segment's fresh weight buffers (and the chunk
    buffer they were copied from) are zeroed before the allocator gets them back."""
    from sealedml.runtime.memory_bounded.container import Container

    handed_out: list[np.ndarray] = []
    decrypt = Container.decrypt

    def spy(self: Container, reader: SealedModelReader, segment, tracker):  # type: ignore[no-untyped-def]
        loaded = decrypt(self, reader, segment, tracker)
        handed_out.extend(loaded.arrays.values())  # keeps the memory alive to look at it
        return loaded

    monkeypatch.setattr(Container, "decrypt", spy)
    with StreamingModel(
        SealedModelReader(mlp_sealed, KEY), budget_bytes=150_000, prefetch=prefetch, optimize=False
    ) as model:
        assert_close(model.run(mlp_feeds).outputs, whole_outputs(mlp_sealed, mlp_feeds))
    assert handed_out and sum(a.nbytes for a in handed_out) == model.plan.weight_bytes
    for array in handed_out:
        assert not np.any(array), "a sealed weight buffer was dropped holding plaintext"
