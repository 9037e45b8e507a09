"""MobileNetV2 (Sandler et al., 2018) with seeded random weights and batch norm folded."""

from __future__ import annotations

import onnx

from sealedml.zoo._builder import NUM_CLASSES, GraphBuilder

__all__ = ["mobilenetv2"]

#: Inverted residual settings of the paper: expansion t, channels c, repeats n, stride s.
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280
#: He gain of the linear bottleneck projection (no activation follows it).
_PROJECT_GAIN = 1.0
#: Gain of the projection when its output is added to an identity shortcut; keeps
#: the residual stream from growing block after block.
_RESIDUAL_PROJECT_GAIN = 0.5


def _inverted_residual(b: GraphBuilder, x: str, index: int, in_ch: int, out_ch: int, stride: int, expand: int) -> str:
    prefix = f"features.{index}.conv"
    hidden = in_ch * expand
    layer = 0
    h = x
    if expand != 1:
        h = b.conv(h, f"{prefix}.{layer}", in_ch, hidden, 1)
        h = b.relu6(h, f"{prefix}.{layer}.relu6")
        layer += 1
    h = b.conv(h, f"{prefix}.{layer}", hidden, hidden, 3, stride=stride, group=hidden)
    h = b.relu6(h, f"{prefix}.{layer}.relu6")
    layer += 1
    residual = stride == 1 and in_ch == out_ch
    gain = _RESIDUAL_PROJECT_GAIN if residual else _PROJECT_GAIN
    h = b.conv(h, f"{prefix}.{layer}", hidden, out_ch, 1, gain=gain)
    if residual:
        h = b.add(x, h, f"features.{index}.add")
    return h


def mobilenetv2(seed: int = 0) -> onnx.ModelProto:
    """Build MobileNetV2 (width 1.0, 224x224) with random weights drawn from ``seed``.

    Stem 3x3/2 convolution to 32 channels, 17 inverted residual blocks, a 1x1
    convolution to 1280 channels, global average pooling, flatten and a
    fully connected layer to 1000 classes. Batch norm is folded into the
    convolutions (every ``Conv`` has a bias); activations are ``Clip(0, 6)``.
    About 3.49 M parameters.

    Args:
        seed: seed of :func:`numpy.random.default_rng`; the same seed gives a
            byte-identical ``SerializeToString()``.

    Returns:
        An opset-17 model with input ``input`` float32 ``[N, 3, 224, 224]`` and
        output ``logits`` float32 ``[N, 1000]``.
    """
    b = GraphBuilder("mobilenetv2", seed, doc="MobileNetV2 1.0 (random weights, BN folded)")
    x = b.image_input()
    x = b.conv(x, "features.0", 3, _STEM_CHANNELS, 3, stride=2)
    x = b.relu6(x, "features.0.relu6")
    in_ch = _STEM_CHANNELS
    index = 1
    for expand, out_ch, repeats, first_stride in _SETTINGS:
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            x = _inverted_residual(b, x, index, in_ch, out_ch, stride, expand)
            in_ch = out_ch
            index += 1
    x = b.conv(x, f"features.{index}", in_ch, _LAST_CHANNELS, 1)
    x = b.relu6(x, f"features.{index}.relu6")
    x = b.global_avg_pool(x, "avgpool")
    x = b.flatten(x, "flatten")
    x = b.gemm(x, "classifier.1", _LAST_CHANNELS, NUM_CLASSES, gain=1.0, output="logits")
    return b.build(x)
