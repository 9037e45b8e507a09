"""ResNet-50 v1.5 (He et al., 2016) with seeded random weights and batch norm folded."""

from __future__ import annotations

import onnx

from sealedml.zoo._builder import NUM_CLASSES, GraphBuilder

__all__ = ["resnet50"]

#: (bottleneck width, number of blocks, stride of the first block) of each stage.
_STAGES: tuple[tuple[int, int, int], ...] = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
_EXPANSION = 4
_STEM_CHANNELS = 64
#: He gain of the last convolution of a residual branch; below 1 so the sum of
#: 16 residual branches does not blow the activations up (the folded analogue
#: of a small last batch-norm scale).
_BRANCH_GAIN = 0.5
#: He gain of the (linear) projection shortcut.
_SHORTCUT_GAIN = 1.0


def _bottleneck(b: GraphBuilder, x: str, prefix: str, in_ch: int, width: int, stride: int) -> str:
    out_ch = width * _EXPANSION
    h = b.conv(x, f"{prefix}.conv1", in_ch, width, 1)
    h = b.relu(h, f"{prefix}.relu1")
    # v1.5: the stride sits on the 3x3 convolution, not on the first 1x1.
    h = b.conv(h, f"{prefix}.conv2", width, width, 3, stride=stride)
    h = b.relu(h, f"{prefix}.relu2")
    h = b.conv(h, f"{prefix}.conv3", width, out_ch, 1, gain=_BRANCH_GAIN)
    shortcut = x
    if stride != 1 or in_ch != out_ch:
        shortcut = b.conv(x, f"{prefix}.downsample.0", in_ch, out_ch, 1, stride=stride, gain=_SHORTCUT_GAIN)
    h = b.add(shortcut, h, f"{prefix}.add")
    return b.relu(h, f"{prefix}.relu3")


def resnet50(seed: int = 0) -> onnx.ModelProto:
    """Build ResNet-50 v1.5 (224x224) with random weights drawn from ``seed``.

    Stem 7x7/2 convolution to 64 channels, ReLU and 3x3/2 max pooling, then
    bottleneck stages of [3, 4, 6, 3] blocks (stride on the 3x3 convolution,
    1x1 projection shortcuts), global average pooling, flatten and a fully
    connected layer 2048 -> 1000. Batch norm is folded into the convolutions
    (every ``Conv`` has a bias). About 25.5 M parameters.

    Args:
        seed: seed of :func:`numpy.random.default_rng`; the same seed gives a
            byte-identical ``SerializeToString()``.

    Returns:
        An opset-17 model with input ``input`` float32 ``[N, 3, 224, 224]`` and
        output ``logits`` float32 ``[N, 1000]``.
    """
    b = GraphBuilder("resnet50", seed, doc="ResNet-50 v1.5 (random weights, BN folded)")
    x = b.image_input()
    x = b.conv(x, "conv1", 3, _STEM_CHANNELS, 7, stride=2)
    x = b.relu(x, "relu")
    x = b.max_pool(x, "maxpool", kernel=3, stride=2, pad=1)
    in_ch = _STEM_CHANNELS
    for stage, (width, blocks, first_stride) in enumerate(_STAGES, start=1):
        for i in range(blocks):
            stride = first_stride if i == 0 else 1
            x = _bottleneck(b, x, f"layer{stage}.{i}", in_ch, width, stride)
            in_ch = width * _EXPANSION
    x = b.global_avg_pool(x, "avgpool")
    x = b.flatten(x, "flatten")
    x = b.gemm(x, "fc", in_ch, NUM_CLASSES, gain=1.0, output="logits")
    return b.build(x)
