"""What an assessment reads: the model's signature and the labelled data sets (``x``, ``y`` in ``.npz``).

Parsed and validated on the way in, so the attacks never see a mis-shaped array: a
:class:`Dataset` has float32 inputs and int64 labels of the same length, and
:meth:`ModelSpec.check` refuses data that does not fit the model, naming the file.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from sealedml.errors import ConfigurationError

__all__ = ["Dataset", "ModelSpec", "load_dataset"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Labelled inputs: ``x`` float32 ``[n, *sample]``, ``y`` int64 ``[n]``.

    Raises:
        ConfigurationError: (on construction) mismatched lengths, no samples, or labels not integers.
    """

    x: np.ndarray
    y: np.ndarray
    source: str = "data"

    def __post_init__(self) -> None:
        x, y = np.asarray(self.x), np.asarray(self.y)
        if y.ndim != 1 or x.ndim < 2 or x.shape[0] != y.shape[0]:
            raise ConfigurationError(
                f"{self.source}: x {tuple(x.shape)} and y {tuple(y.shape)} must hold the same number of samples"
            )
        if len(y) == 0:
            raise ConfigurationError(f"{self.source}: no samples")
        if y.dtype.kind not in "iu":
            raise ConfigurationError(f"{self.source}: y must hold integer labels, not {y.dtype}")
        if x.dtype.kind not in "fiu" or not np.all(np.isfinite(x)):
            raise ConfigurationError(f"{self.source}: x must hold finite numbers")
        object.__setattr__(self, "x", np.ascontiguousarray(x, dtype=np.float32))
        object.__setattr__(self, "y", np.ascontiguousarray(y, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> Dataset:
        """The samples at ``indices``."""
        return Dataset(self.x[indices], self.y[indices], self.source)


def load_dataset(path: Path) -> Dataset:
    """Read ``x`` (inputs) and ``y`` (int labels) from an ``.npz`` file.

    Raises:
        ConfigurationError: a missing or unreadable file, or no ``x`` / ``y`` array in it.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{path}: no such file") from exc
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigurationError(f"{path}: not an .npz file with arrays x and y") from exc
    if not isinstance(arrays, dict):  # a plain .npy loads as one array
        raise ConfigurationError(f"{path}: not an .npz file with arrays x and y")
    for name, what in (("x", "the inputs"), ("y", "the labels")):
        if name not in arrays:
            raise ConfigurationError(f"{path}: no array {name!r} ({what}); it has {', '.join(arrays) or 'none'}")
    return Dataset(arrays["x"], arrays["y"], str(path))


@dataclass(frozen=True)
class ModelSpec:
    """The signature an assessment needs: one image input ``[N, C, H, W]`` and one class output ``[N, K]``.

    Attributes:
        input: the input tensor's name.
        sample_shape: ``(C, H, W)``.
        output: the first output's name (the one whose classes are assessed).
        classes: ``K``.
    """

    input: str
    sample_shape: tuple[int, ...]
    output: str
    classes: int

    @classmethod
    def of(cls, model: onnx.ModelProto) -> ModelSpec:
        """The spec of ``model``.

        Raises:
            ConfigurationError: not one float image input with fixed ``C, H, W``, or no ``[N, K]`` output.
        """
        constants = {init.name for init in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in constants]
        if len(inputs) != 1:
            raise ConfigurationError(f"assess needs a model with one input, this one has {len(inputs)}")
        tensor = inputs[0].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or None in dims[1:]:
            raise ConfigurationError(
                f"assess needs a float32 image input [N, C, H, W] with fixed C, H, W; {inputs[0].name!r} is not"
            )
        outputs = list(model.graph.output)
        out_dims = [d.dim_value if d.HasField("dim_value") else None for d in outputs[0].type.tensor_type.shape.dim]
        if len(out_dims) != 2 or not out_dims[1] or out_dims[1] < 2:
            raise ConfigurationError(f"assess needs a class output [N, K]; {outputs[0].name!r} is not")
        return cls(inputs[0].name, tuple(int(d) for d in dims[1:] if d), outputs[0].name, int(out_dims[1]))

    def check(self, data: Dataset) -> None:
        """Refuse data that does not fit the model.

        Raises:
            ConfigurationError: a per-sample shape other than :attr:`sample_shape`, or a label outside ``0..K-1``.
        """
        if tuple(data.x.shape[1:]) != self.sample_shape:
            raise ConfigurationError(
                f"{data.source}: x has samples of shape {tuple(data.x.shape[1:])}, the model takes {self.sample_shape}"
            )
        if data.y.min() < 0 or data.y.max() >= self.classes:
            raise ConfigurationError(f"{data.source}: labels must be in 0..{self.classes - 1}")
