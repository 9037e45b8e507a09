"""Tensors on the wire (:mod:`sealedml.envelope.tensors`): safetensors bytes."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from sealedml.envelope.tensors import POSITIONAL_KEY, decode_tensors, encode_tensor_parts, encode_tensors, positional
from sealedml.errors import EnvelopeError

DTYPES = [
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
]
SHAPES = [(0,), (1,), (3,), (0, 4), (2, 3), (2, 1, 3, 2)]


def _sample(dtype: type[np.generic], shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{np.dtype(dtype).str}{shape}".encode()))
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def _safetensors(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_encode_decode_roundtrip(dtype: type[np.generic], shape: tuple[int, ...]) -> None:
    array = _sample(dtype, shape)
    tensors, is_positional = decode_tensors(encode_tensors({"t": array}))
    assert is_positional is False
    assert list(tensors) == ["t"]
    out = tensors["t"]
    assert out.dtype == array.dtype
    assert out.shape == shape
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.bool_], ids=lambda d: np.dtype(d).name)
def test_scalar_tensor_keeps_its_shape(dtype: type[np.generic]) -> None:
    scalar = np.array(1, dtype=dtype)
    out, _ = decode_tensors(encode_tensors({"s": scalar}))
    assert out["s"].shape == ()
    assert out["s"].dtype == scalar.dtype
    assert out["s"] == scalar


def test_roundtrip_preserves_extreme_values() -> None:
    arrays = {
        "f32": np.array([np.inf, -np.inf, -0.0, np.finfo(np.float32).tiny], dtype=np.float32),
        "i64": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max], dtype=np.int64),
        "u64": np.array([0, np.iinfo(np.uint64).max], dtype=np.uint64),
    }
    out, _ = decode_tensors(encode_tensors(arrays))
    for name, array in arrays.items():
        assert out[name].tobytes() == array.tobytes()
    nan_out, _ = decode_tensors(encode_tensors({"n": np.array([np.nan], dtype=np.float64)}))
    assert np.isnan(nan_out["n"][0])


def test_roundtrip_of_non_contiguous_and_big_endian_arrays() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    arrays = {
        "transposed": base.T,
        "strided": base[::2, ::3],
        "big_endian": np.arange(5, dtype=">i4"),
        "big_endian_float": np.linspace(-1, 1, 7).astype(">f8"),
    }
    out, _ = decode_tensors(encode_tensors(arrays))
    for name, array in arrays.items():
        np.testing.assert_array_equal(out[name], array)
        assert out[name].shape == array.shape


def test_named_tensors_keep_names_and_flag() -> None:
    arrays = {"input": np.ones((1, 4), np.float32), "attention_mask": np.ones((1, 4), np.int64), "ü": np.zeros(2)}
    out, is_positional = decode_tensors(encode_tensors(arrays))
    assert is_positional is False
    assert set(out) == set(arrays)


def test_positional_names_tensors_by_index() -> None:
    arrays = [np.zeros(1), np.ones(2), np.full(3, 2.0)]
    named = positional(arrays)
    assert list(named) == ["0", "1", "2"]
    assert named["2"] is arrays[2]


def test_positional_order_of_twelve_tensors_is_preserved() -> None:
    """Lexicographic order would put "10" and "11" before "2"; decode must use index order."""
    arrays = [np.full((i + 1,), i, dtype=np.int32) for i in range(12)]
    out, is_positional = decode_tensors(encode_tensors(positional(arrays), is_positional=True))
    assert is_positional is True
    assert list(out) == [str(i) for i in range(12)]
    for (name, value), expected in zip(out.items(), arrays, strict=True):
        np.testing.assert_array_equal(value, expected, err_msg=name)


def test_positional_order_is_restored_whatever_the_insertion_order() -> None:
    arrays = {str(i): np.array([i], dtype=np.int64) for i in reversed(range(11))}
    out, _ = decode_tensors(encode_tensors(arrays, is_positional=True))
    assert [int(v[0]) for v in out.values()] == list(range(11))


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(np.array(["a", "bc"]), id="unicode-str"),
        pytest.param(np.array([b"a", b"bc"]), id="bytes"),
        pytest.param(np.array([{"a": 1}, None], dtype=object), id="object"),
        pytest.param(np.array([1 + 2j], dtype=np.complex64), id="complex64"),
        pytest.param(np.array(["2024-01-01"], dtype="datetime64[D]"), id="datetime"),
        pytest.param(
            np.array([1], dtype=np.longdouble)
            if np.dtype(np.longdouble).itemsize > 8
            else np.array([1], dtype="timedelta64[s]"),
            id="longdouble-or-timedelta",
        ),
        pytest.param(np.zeros(2, dtype=[("a", np.int32), ("b", np.float32)]), id="structured"),
    ],
)
def test_encode_rejects_unsupported_dtype(array: np.ndarray) -> None:
    with pytest.raises(EnvelopeError):
        encode_tensors({"x": array, "ok": np.zeros(1)})


def test_encode_rejects_unsupported_dtype_naming_the_tensor() -> None:
    with pytest.raises(EnvelopeError, match="'labels'"):
        encode_tensors({"labels": np.array(["cat"])})


# -- decode: valid known-answer vectors -------------------------------------------


def test_decode_known_answer_vector() -> None:
    data = _safetensors(
        {
            "__metadata__": {POSITIONAL_KEY: "1"},
            "1": {"dtype": "I64", "shape": [2], "data_offsets": [4, 20]},
            "0": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
        },
        np.array(1.5, dtype="<f4").tobytes() + np.array([-1, 7], dtype="<i8").tobytes(),
    )
    out, is_positional = decode_tensors(data)
    assert is_positional is True
    assert list(out) == ["0", "1"]
    assert out["0"].shape == () and out["0"].dtype == np.float32 and float(out["0"]) == 1.5
    np.testing.assert_array_equal(out["1"], np.array([-1, 7], dtype=np.int64))


def test_decode_ignores_foreign_metadata() -> None:
    data = _safetensors(
        {"__metadata__": {"format": "pt"}, "x": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}},
        b"\x01\x02\x03",
    )
    out, is_positional = decode_tensors(data)
    assert is_positional is False
    np.testing.assert_array_equal(out["x"], np.array([1, 2, 3], dtype=np.uint8))


# -- decode: invalid vectors --------------------------------------------------------

_F32_1 = np.array([1.0], dtype="<f4").tobytes()

MALFORMED = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00" * 7, id="shorter-than-length-prefix"),
    pytest.param((0).to_bytes(8, "little"), id="zero-length-header"),
    pytest.param((2**40).to_bytes(8, "little") + b"{}", id="header-length-beyond-data"),
    pytest.param((8).to_bytes(8, "little") + b"not json", id="header-not-json"),
    pytest.param((8).to_bytes(8, "little") + b"[1,2,3] ", id="header-not-object"),
    pytest.param((8).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8", id="header-not-utf8"),
    pytest.param(
        _safetensors({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, _F32_1), id="data-truncated"
    ),
    pytest.param(
        _safetensors({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, _F32_1),
        id="shape-does-not-match-length",
    ),
    pytest.param(
        _safetensors({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, _F32_1 * 2), id="hole-before-data"
    ),
    pytest.param(
        _safetensors(
            {
                "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            _F32_1,
        ),
        id="overlapping-tensors",
    ),
    pytest.param(
        _safetensors({"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, _F32_1), id="unknown-dtype"
    ),
    pytest.param(
        _safetensors({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, _F32_1), id="negative-dim"
    ),
    pytest.param(_safetensors({"x": {"dtype": "F32", "shape": [1]}}, _F32_1), id="missing-offsets"),
    pytest.param(
        _safetensors({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, _F32_1)[:-1], id="last-byte-dropped"
    ),
    pytest.param(
        _safetensors({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, _F32_1) + b"\x00",
        id="trailing-byte",
    ),
    pytest.param(
        _safetensors(
            {"__metadata__": {POSITIONAL_KEY: "1"}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, _F32_1
        ),
        id="positional-non-integer-name",
    ),
    pytest.param(
        _safetensors(
            {
                "__metadata__": {POSITIONAL_KEY: "1"},
                "0": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "2": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            _F32_1 * 2,
        ),
        id="positional-gap",
    ),
    pytest.param(
        _safetensors(
            {"__metadata__": {POSITIONAL_KEY: "1"}, "1": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, _F32_1
        ),
        id="positional-not-starting-at-zero",
    ),
    pytest.param(
        _safetensors(
            {"__metadata__": {POSITIONAL_KEY: "1"}, "00": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            _F32_1,
        ),
        id="positional-leading-zero",
    ),
    pytest.param(
        _safetensors(
            {"__metadata__": {POSITIONAL_KEY: "1"}, " 0": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            _F32_1,
        ),
        id="positional-space",
    ),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_decode_rejects_malformed_bytes(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode_tensors(data)


def test_decode_rejects_every_truncation_of_a_valid_payload() -> None:
    data = encode_tensors({"x": np.arange(6, dtype=np.float32), "y": np.array(3, dtype=np.int64)})
    for keep in range(len(data)):
        with pytest.raises(EnvelopeError):
            decode_tensors(data[:keep])


@pytest.mark.parametrize("dtype", ["BF16", "F8_E4M3", "F8_E5M2"])
def test_decode_rejects_dtype_numpy_cannot_represent(dtype: str) -> None:
    count = 4 if dtype == "BF16" else 8
    data = _safetensors({"x": {"dtype": dtype, "shape": [count], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(EnvelopeError):
        decode_tensors(data)


@pytest.mark.parametrize("is_positional", [False, True])
def test_encode_tensor_parts_equal_safetensors_byte_for_byte(is_positional: bool) -> None:
    """Every carried dtype, scalars, empty, non-contiguous and big-endian arrays: the parts joined
    are exactly what the library writes, and each buffer is the array's own memory when it can be."""
    tensors = {f"t{i}": _sample(dtype, (2, 3)) for i, dtype in enumerate(DTYPES)}
    tensors |= {
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "strided": np.arange(20, dtype=np.int64)[::3],
        "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
    }
    parts = encode_tensor_parts(tensors, is_positional=is_positional)
    joined = parts.header + b"".join(bytes(b) for b in parts.buffers)
    assert joined == encode_tensors(tensors, is_positional=is_positional)
    assert parts.size == len(joined)
    contiguous = np.zeros((1, 3, 8, 8), dtype=np.float32)
    (view,) = encode_tensor_parts({"x": contiguous}).buffers
    assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), contiguous)  # no copy


def test_encode_tensor_parts_rejects_unsupported_dtypes_naming_the_tensor() -> None:
    with pytest.raises(EnvelopeError, match="'labels'"):
        encode_tensor_parts({"labels": np.array(["cat"])})
    with pytest.raises(EnvelopeError):
        encode_tensor_parts({"when": np.array([1], dtype="timedelta64[s]")})
