"""Streaming execution over a tampered container or spill file: every attack ends the request in a
typed ``SealedModelError``, and the model object keeps serving afterwards.

Sealed segments (``optimize=False``, and the fallback of the optimized mode) re-read the sealed
container on every request and authenticate each AES-GCM chunk before using its bytes, so
tampering *after* the model was loaded is still caught — unlike the whole-model path, which
decrypts once. A failed request leaves no state behind: its decrypted weights, its in-flight
prefetch and its activations are dropped, and the next request starts clean.

Optimized segments (the default) authenticate the whole container once, at load, and from then on
read only their spill file, sealed under a key that exists only in the process: a tampered,
moved or truncated spill chunk fails the request, and the next request rebuilds that segment
from the (re-authenticated) sealed container. No plaintext weight — original or reordered by
ONNX Runtime — is ever written to disk.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml.crypto import TAG_SIZE
from sealedml.envelope.model_container import SealedModelReader, seal_model
from sealedml.errors import InputError, SealedModelError
from sealedml.runtime.memory_bounded import StreamingModel
from sealedml.runtime.memory_bounded.accounting import MemoryTracker
from sealedml.runtime.memory_bounded.container import Container
from sealedml.runtime.memory_bounded.optimize import optimize_segment

KEY = bytes(range(32))
OTHER_KEY = bytes(range(32, 64))
CHUNK = 1024
BUDGET = 40_000


def mlp() -> onnx.ModelProto:
    """Four 16 KiB layers: at a 40 kB budget they take two to four segments."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "x"
    for i in range(4):
        inits.append(numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.2, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 64])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def sealed() -> bytes:
    return seal_model(mlp(), model_id="mlp", model_version=1, model_key=KEY, chunk_size=CHUNK)


@pytest.fixture
def feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}


def weight_chunk_offset(sealed: bytes, tensor: str) -> int:
    """File offset of a ciphertext byte inside a chunk that only ``tensor`` uses."""
    reader = SealedModelReader(sealed, KEY)
    entry = reader.manifest.tensor(tensor)
    index = (entry.offset + entry.length // 2) // CHUNK
    return reader.header.data_offset + index * (CHUNK + TAG_SIZE) + 100


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("tensor", ["w0", "w3"])  # first and last segment
def test_tampered_weight_chunk_fails_the_run_and_the_model_keeps_serving(
    tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray], prefetch: bool, tensor: str
) -> None:
    path = tmp_path / "model.sealed"
    path.write_bytes(sealed)
    model = StreamingModel(SealedModelReader(path, KEY), budget_bytes=BUDGET, prefetch=prefetch, optimize=False)
    segments = model.plan.segments
    assert len(segments) >= 2
    where = [k for k, seg in enumerate(segments) if any(w.tensor == tensor for w in seg.weights)]
    assert where == ([0] if tensor == "w0" else [len(segments) - 1])
    good = model.run(feeds).outputs
    threads_before = threading.active_count()

    path.write_bytes(flip(sealed, weight_chunk_offset(sealed, tensor)))  # tampered at rest, after loading
    for _ in range(3):
        with pytest.raises(SealedModelError, match="failed authentication") as info:
            model.run(feeds)
        assert not isinstance(info.value, InputError)
    assert threading.active_count() <= threads_before + 2  # no prefetch thread leaked per failure

    path.write_bytes(sealed)  # restored: the same object serves again, with the same answer
    again = model.run(feeds).outputs
    np.testing.assert_array_equal(again["r3"], good["r3"])
    assert model.last_peak_bytes is not None and model.last_peak_bytes <= BUDGET
    model.close()


def test_tampered_copy_fails_only_the_request_that_reads_it(sealed: bytes, feeds: dict[str, np.ndarray]) -> None:
    tampered = flip(sealed, weight_chunk_offset(sealed, "w2"))
    queue = [sealed, tampered, sealed]  # construction, then one request per reader

    def next_reader() -> SealedModelReader:
        return SealedModelReader(queue.pop(0), KEY)

    model = StreamingModel(next_reader, budget_bytes=BUDGET, optimize=False)
    with pytest.raises(SealedModelError):
        model.run(feeds)
    assert model.run(feeds).outputs["r3"].shape == (1, 64)
    model.close()


def test_resealed_container_is_refused_instead_of_misread(sealed: bytes, feeds: dict[str, np.ndarray]) -> None:
    # Same model and key sealed again: a fresh salt and different chunk keys. The plan's
    # offsets belong to the first container, so a swap must fail loudly.
    other = seal_model(mlp(), model_id="mlp", model_version=1, model_key=KEY, chunk_size=CHUNK)
    queue = [sealed, other]
    model = StreamingModel(lambda: SealedModelReader(queue.pop(0), KEY), budget_bytes=BUDGET, optimize=False)
    with pytest.raises(SealedModelError, match="changed"):
        model.run(feeds)


def test_moved_chunk_fails_authentication(tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray]) -> None:
    reader = SealedModelReader(sealed, KEY)
    h = reader.header
    a = (reader.manifest.tensor("w1").offset + 10) // CHUNK
    b = (reader.manifest.tensor("w2").offset + 10) // CHUNK
    stride = CHUNK + TAG_SIZE
    data = bytearray(sealed)
    start_a, start_b = h.data_offset + a * stride, h.data_offset + b * stride
    data[start_a : start_a + stride] = sealed[start_b : start_b + stride]  # valid ciphertext, wrong place
    path = tmp_path / "moved.sealed"
    path.write_bytes(sealed)
    model = StreamingModel(SealedModelReader(path, KEY), budget_bytes=BUDGET, optimize=False)
    path.write_bytes(bytes(data))
    with pytest.raises(SealedModelError):
        model.run(feeds)


def test_truncated_container_fails_the_run(tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray]) -> None:
    path = tmp_path / "model.sealed"
    path.write_bytes(sealed)
    model = StreamingModel(SealedModelReader(path, KEY), budget_bytes=BUDGET, prefetch=True, optimize=False)
    path.write_bytes(sealed[: len(sealed) - 3000])
    with pytest.raises(SealedModelError):
        model.run(feeds)


def test_wrong_key_fails_at_construction(sealed: bytes) -> None:
    with pytest.raises(SealedModelError):
        StreamingModel(SealedModelReader(sealed, OTHER_KEY), budget_bytes=BUDGET)


# -- optimized segments: the spill file ------------------------------------------------------------


class SpillAccess:
    """Raw read/write access to a model's spill store by store position: the test plays the attacker.

    A file-backed store is rewritten through its descriptor; an in-memory one through its
    buffers (an attacker who can write the process's private memory could also read the
    key, so for memory this stands in for a bug or a fault rather than a realistic attack).
    """

    def __init__(self, model: StreamingModel) -> None:
        assert model.spill is not None
        self.model = model
        self.store = model.spill

    def chunk(self, segment: int, chunk: int = 0) -> tuple[int, int]:
        """(store position, length) of one chunk of an optimized segment's spilled weights."""
        entry = self.model.segment_states[segment].entry
        assert entry is not None
        c = entry.chunks[chunk]
        return c.position, c.length

    def _locate(self, position: int) -> tuple[memoryview, int]:
        for state in self.model.segment_states:
            entry = state.entry
            if entry is not None and entry.offset <= position < entry.offset + entry.length:
                return self.store.stored(entry), position - entry.offset
        raise AssertionError(f"no live entry at {position}")

    def read(self, position: int, length: int) -> bytes:
        if not self.store.in_memory:
            return os.pread(self.store.fileno, length, position)
        view, local = self._locate(position)
        return bytes(view[local : local + length])

    def write(self, position: int, data: bytes) -> None:
        if not self.store.in_memory:
            os.pwrite(self.store.fileno, data, position)
            return
        view, local = self._locate(position)
        view[local : local + len(data)] = data

    def flip(self, position: int) -> None:
        self.write(position, bytes([self.read(position, 1)[0] ^ 0x01]))


BACKINGS = ["memory", "file"]


def spill_dir(backing: str, tmp_path: Path) -> str | None:
    if backing == "memory":
        return None
    directory = tmp_path / "spill"
    directory.mkdir(exist_ok=True)
    return str(directory)


def test_optimized_mode_authenticates_the_container_at_load(tmp_path: Path, sealed: bytes) -> None:
    path = tmp_path / "model.sealed"
    path.write_bytes(flip(sealed, weight_chunk_offset(sealed, "w3")))
    with pytest.raises(SealedModelError, match="failed authentication"):
        StreamingModel(SealedModelReader(path, KEY), budget_bytes=BUDGET)


def test_optimized_mode_reads_the_container_only_at_load(
    tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray]
) -> None:
    # By design: after load the spill is the authority. Tampering with the container afterwards
    # is not noticed until a segment has to be rebuilt from it (next test).
    path = tmp_path / "model.sealed"
    path.write_bytes(sealed)
    model = StreamingModel(SealedModelReader(path, KEY), budget_bytes=BUDGET)
    assert set(model.segment_modes) == {"optimized"}
    good = model.run(feeds).outputs
    path.write_bytes(flip(sealed, weight_chunk_offset(sealed, "w1")))
    np.testing.assert_array_equal(model.run(feeds).outputs["r3"], good["r3"])
    model.close()


@pytest.mark.parametrize("backing", BACKINGS)
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("where", ["first", "last"])
def test_tampered_spill_chunk_fails_the_run_and_the_segment_is_rebuilt(
    tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray], prefetch: bool, where: str, backing: str
) -> None:
    path = tmp_path / "model.sealed"
    path.write_bytes(sealed)
    # Without the warm head, so that the run after the tamper is the one that reads the chunk
    # (the warm head's own case is the next test).
    model = StreamingModel(
        SealedModelReader(path, KEY),
        budget_bytes=BUDGET,
        prefetch=prefetch,
        spill_dir=spill_dir(backing, tmp_path),
        warm_first_segment=False,
    )
    assert len(model.plan.segments) >= 2 and set(model.segment_modes) == {"optimized"}
    assert model.spill is not None and model.spill.in_memory == (backing == "memory")
    good = model.run(feeds).outputs
    threads_before = threading.active_count()
    written_before = model.spill.size
    segment = 0 if where == "first" else len(model.plan.segments) - 1
    old_entry = model.segment_states[segment].entry
    spill = SpillAccess(model)
    position, length = spill.chunk(segment, chunk=1)
    spill.flip(position + length // 2)

    with pytest.raises(SealedModelError, match=r"spill chunk .* failed authentication") as info:
        model.run(feeds)
    assert not isinstance(info.value, InputError)
    assert threading.active_count() <= threads_before + 2  # no prefetch thread leaked
    assert model.stale_segments == {segment}
    # The next request rebuilds the segment from the sealed container, under fresh nonces
    # in a new entry, and serves the same answer.
    again = model.run(feeds).outputs
    assert not model.stale_segments
    np.testing.assert_array_equal(again["r3"], good["r3"])
    assert model.segment_modes[segment] == "optimized"
    new_entry = model.segment_states[segment].entry
    assert old_entry is not None and new_entry is not None and new_entry.entry_id > old_entry.entry_id
    assert {c.nonce for c in new_entry.chunks}.isdisjoint(c.nonce for c in old_entry.chunks)
    if backing == "memory":
        assert model.spill.size == written_before  # the superseded entry's ciphertext is dropped
        assert not model.spill.intact(old_entry)
    else:
        assert model.spill.size > written_before  # a file only grows
    assert model.last_peak_bytes is not None and model.last_peak_bytes <= BUDGET
    np.testing.assert_array_equal(model.run(feeds).outputs["r3"], good["r3"])
    model.close()


@pytest.mark.parametrize("backing", BACKINGS)
def test_a_warm_head_authenticates_the_chunks_it_decrypts_ahead(
    tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray], backing: str
) -> None:
    """The first segment is decrypted for the next request once a request has returned: a
    chunk tampered with before that fails the request that adopts it; the one after it
    rebuilds the segment. A chunk tampered with after its authentic contents were decrypted
    is caught by the next read of that chunk."""
    model = StreamingModel(
        SealedModelReader(sealed, KEY), budget_bytes=BUDGET, prefetch=True, spill_dir=spill_dir(backing, tmp_path)
    )
    assert model.warm_first_segment and model.segment_modes[0] == "optimized"
    good = model.run(feeds).outputs
    model.settle()  # the second request's first segment is decrypted, authentic
    spill = SpillAccess(model)
    position, length = spill.chunk(0, chunk=1)
    spill.flip(position + length // 2)
    # The second request runs on weights authenticated before the tamper.
    np.testing.assert_array_equal(model.run(feeds).outputs["r3"], good["r3"])
    model.settle()  # the third request's: this read hit the tampered chunk
    with pytest.raises(SealedModelError, match=r"spill chunk .* failed authentication"):
        model.run(feeds)
    assert model.stale_segments == {0}
    np.testing.assert_array_equal(model.run(feeds).outputs["r3"], good["r3"])  # rebuilt
    assert not model.stale_segments
    assert model.last_peak_bytes is not None and model.last_peak_bytes <= BUDGET
    model.close()


@pytest.mark.parametrize("backing", BACKINGS)
def test_moved_spill_chunk_fails(tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray], backing: str) -> None:
    model = StreamingModel(
        SealedModelReader(sealed, KEY),
        budget_bytes=BUDGET,
        prefetch=True,
        spill_dir=spill_dir(backing, tmp_path),
        warm_first_segment=False,  # the run after each tamper is the one that reads segment 0
    )
    good = model.run(feeds).outputs
    spill = SpillAccess(model)
    first, length = spill.chunk(0, chunk=0)
    second, length2 = spill.chunk(0, chunk=1)
    assert length == length2
    spill.write(second, spill.read(first, length))  # an authentic chunk at the wrong place
    with pytest.raises(SealedModelError, match="failed authentication"):
        model.run(feeds)
    np.testing.assert_array_equal(model.run(feeds).outputs["r3"], good["r3"])  # rebuilt
    # An authentic chunk of another segment's entry, at the same index: the AAD binds the entry.
    first, length = spill.chunk(0, chunk=0)  # segment 0 was rebuilt into a new entry
    # (a segment whose first chunk is as long: a same-size swap)
    others = [spill.chunk(k, chunk=0) for k in range(1, len(model.plan.segments))]
    other = next(position for position, size in others if size == length)
    spill.write(first, spill.read(other, length))
    with pytest.raises(SealedModelError, match="failed authentication"):
        model.run(feeds)
    np.testing.assert_array_equal(model.run(feeds).outputs["r3"], good["r3"])
    model.close()


def test_truncated_spill_file_fails_then_every_cut_segment_is_rebuilt(
    tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray]
) -> None:
    model = StreamingModel(
        SealedModelReader(sealed, KEY), budget_bytes=BUDGET, prefetch=True, spill_dir=spill_dir("file", tmp_path)
    )
    good = model.run(feeds).outputs
    assert model.spill is not None
    last = model.segment_states[-1].entry
    assert last is not None
    # Cut into the last segment's weights: one failed request, then every truncated segment
    # is rebuilt.
    os.ftruncate(model.spill.fileno, last.offset + 10)
    with pytest.raises(SealedModelError, match=r"truncated|failed authentication"):
        model.run(feeds)
    np.testing.assert_array_equal(model.run(feeds).outputs["r3"], good["r3"])
    np.testing.assert_array_equal(model.run(feeds).outputs["r3"], good["r3"])
    model.close()


@pytest.mark.parametrize("backing", BACKINGS)
def test_rebuild_needs_an_authentic_container(
    tmp_path: Path, sealed: bytes, feeds: dict[str, np.ndarray], backing: str
) -> None:
    path = tmp_path / "model.sealed"
    path.write_bytes(sealed)
    model = StreamingModel(
        SealedModelReader(path, KEY), budget_bytes=BUDGET, prefetch=False, spill_dir=spill_dir(backing, tmp_path)
    )
    good = model.run(feeds).outputs
    spill = SpillAccess(model)
    position, _ = spill.chunk(0)
    spill.flip(position + 5)
    path.write_bytes(flip(sealed, weight_chunk_offset(sealed, "w0")))  # and the container too
    with pytest.raises(SealedModelError, match="spill"):
        model.run(feeds)
    for _ in range(2):  # the rebuild reads the tampered container: refused, every time
        with pytest.raises(SealedModelError, match=r"sealed model chunk .* failed authentication"):
            model.run(feeds)
    path.write_bytes(sealed)
    np.testing.assert_array_equal(model.run(feeds).outputs["r3"], good["r3"])
    model.close()


def conv_gemm() -> onnx.ModelProto:
    """Convolutions (ONNX Runtime reorders their weights to NCHWc) and a Gemm (kept as is)."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.standard_normal((20, 16, 3, 3)) * 0.1).astype(np.float32), "conv0.weight"),
        numpy_helper.from_array((rng.standard_normal((32, 20, 3, 3)) * 0.1).astype(np.float32), "conv1.weight"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "conv1.bias"),
        numpy_helper.from_array((rng.standard_normal((10, 32 * 14 * 14)) * 0.01).astype(np.float32), "fc.weight"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv0.weight"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p1"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.weight"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def probes(data: bytes, count: int = 4, width: int = 48) -> list[bytes]:
    """A few windows of ``data`` that are mostly non-zero (NCHWc padding is zeros)."""
    found: list[bytes] = []
    step = max(width, len(data) // (count + 1))
    for start in range(0, max(0, len(data) - width), step):
        window = data[start : start + width]
        if sum(b != 0 for b in window) >= width // 2:
            found.append(window)
    return found[:count] or ([data] if data.strip(b"\x00") else [])


def test_no_plaintext_weight_touches_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sealed = seal_model(conv_gemm(), model_id="cg", model_version=1, model_key=KEY, chunk_size=4096)
    store = tmp_path / "store"
    scratch = tmp_path / "tmpdir"
    workdir = tmp_path / "cwd"
    for d in (store, scratch, workdir):
        d.mkdir()
    (store / "model.sealed").write_bytes(sealed)
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.chdir(workdir)
    x = {"x": np.random.default_rng(0).standard_normal((1, 16, 28, 28)).astype(np.float32)}

    # The file-backed spill (the in-memory one writes nothing anywhere).
    model = StreamingModel(
        SealedModelReader(store / "model.sealed", KEY), budget_bytes=400_000, prefetch=True, spill_dir=str(scratch)
    )
    assert set(model.segment_modes) == {"optimized"} and model.load_stats.nchwc_nodes > 0
    model.run(x)

    # Known plaintext: every original weight, and every optimized (reordered, padded) weight,
    # recomputed here the same way the executor computes it.
    reader = SealedModelReader(sealed, KEY)
    secrets = [reader.read(e.offset, e.length) for e in reader.manifest.tensors if e.length >= 48]
    for segment in model.plan.segments:
        loaded = Container(reader).decrypt(reader, segment, MemoryTracker())
        opt = optimize_segment(
            model.plan.segment_model(segment.index),
            loaded.arrays,
            inputs=segment.inputs,
            outputs=segment.outputs,
            constants=model.plan.constants,
        )
        secrets += [view.tobytes() for _, _, _, view in opt.tensors if view.nbytes >= 48]
    needles = [probe for secret in secrets for probe in probes(secret)]
    assert len(needles) >= 8

    # Everything written under TMPDIR and the working directory: named files, and files
    # this process holds open there (the spill file is anonymous: O_TMPFILE or unlinked).
    written: list[bytes] = []
    for root in (scratch, workdir):
        for dirpath, _, names in os.walk(root):
            written += [Path(dirpath, name).read_bytes() for name in names]
    spill_seen = False
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(scratch)) or target.startswith(str(workdir)):
            with open(f"/proc/self/fd/{fd}", "rb") as handle:
                written.append(handle.read())
            spill_seen = spill_seen or int(fd) == (model.spill.fileno if model.spill else -1)
    assert spill_seen, "the spill file should live in $TMPDIR"
    assert sum(map(len, written)) >= model.load_stats.weight_bytes  # the spill (ciphertext) was scanned
    for blob in written:
        for needle in needles:
            assert needle not in blob
    model.close()
