"""VGG-16 (Simonyan and Zisserman, 2015, configuration D) with seeded random weights."""

from __future__ import annotations

import onnx

from sealedml.zoo._builder import NUM_CLASSES, GraphBuilder

__all__ = ["vgg16"]

#: Convolution widths of configuration D; ``None`` marks a 2x2/2 max pooling.
_CONFIG: tuple[int | None, ...] = (
    64, 64, None,
    128, 128, None,
    256, 256, 256, None,
    512, 512, 512, None,
    512, 512, 512, None,
)  # fmt: skip
_POOLED_SIDE = 7
_HIDDEN = 4096


def vgg16(seed: int = 0) -> onnx.ModelProto:
    """Build VGG-16 (224x224) with random weights drawn from ``seed``.

    Thirteen 3x3 convolutions with bias and ReLU, a 2x2/2 max pooling after
    each of the five blocks, flatten, then ``Gemm`` 25088 -> 4096, ReLU,
    ``Gemm`` 4096 -> 4096, ReLU, ``Gemm`` 4096 -> 1000 (dropout omitted, it is
    the identity at inference). Node and initializer names follow torchvision
    (``features.28``, ``classifier.0``). 138.36 M parameters, about 553 MB of
    float32 weights; building takes a few seconds and the serialized model
    stays under the 2 GB protobuf limit.

    Args:
        seed: seed of :func:`numpy.random.default_rng`; the same seed gives a
            byte-identical ``SerializeToString()``.

    Returns:
        An opset-17 model with input ``input`` float32 ``[N, 3, 224, 224]`` and
        output ``logits`` float32 ``[N, 1000]``.
    """
    b = GraphBuilder("vgg16", seed, doc="VGG-16 (random weights)")
    x = b.image_input()
    in_ch = 3
    index = 0
    for width in _CONFIG:
        if width is None:
            x = b.max_pool(x, f"features.{index}", kernel=2, stride=2)
            index += 1
            continue
        x = b.conv(x, f"features.{index}", in_ch, width, 3)
        x = b.relu(x, f"features.{index + 1}")
        in_ch = width
        index += 2
    x = b.flatten(x, "flatten")
    x = b.gemm(x, "classifier.0", in_ch * _POOLED_SIDE * _POOLED_SIDE, _HIDDEN, gain=2**0.5)
    x = b.relu(x, "classifier.1")
    x = b.gemm(x, "classifier.3", _HIDDEN, _HIDDEN, gain=2**0.5)
    x = b.relu(x, "classifier.4")
    x = b.gemm(x, "classifier.6", _HIDDEN, NUM_CLASSES, gain=1.0, output="logits")
    return b.build(x)
