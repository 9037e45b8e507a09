"""A MiniLM-sized BERT encoder: the transformer workload beside the zoo's CNNs.

Six layers, hidden size 384, 12 heads of 32, feed-forward 1536, sequence 128, the
30,522-token WordPiece vocabulary and 512 positions: the shape of
``all-MiniLM-L6-v2`` (22.7 M parameters, 91 MB), built with ``onnx.helper`` from a
seeded generator, no torch. Weights are random (for speed and memory figures, not
for meaning).

Inputs: ``input_ids`` and ``attention_mask``, int64 ``[N, 128]``. Outputs:
``last_hidden_state`` float32 ``[N, 128, 384]`` and ``sentence_embedding`` ``[N, 384]``,
the mean of the hidden states over the tokens the mask keeps (as sentence-transformers
pools). Attention adds −10,000 to the scores of masked keys, so a masked token changes
nothing the unmasked ones compute. GELU is written with ``Erf`` (opset 17 has no
``Gelu``); layer normalization is ``LayerNormalization``.

:class:`MiniLMConfig` sizes a smaller encoder of the same graph for fast tests, and
:func:`sample_inputs` gives a padded batch of token ids the benchmarks feed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sealedml.zoo._builder import IR_VERSION, OPSET

__all__ = ["HEADS", "HIDDEN", "LAYERS", "MINILM", "SEQUENCE", "VOCAB", "MiniLMConfig", "minilm", "sample_inputs"]

LAYERS, HIDDEN, HEADS, FFN, SEQUENCE, VOCAB, POSITIONS = 6, 384, 12, 1536, 128, 30522, 512


@dataclass(frozen=True)
class MiniLMConfig:
    """The sizes of an encoder.

    Attributes:
        layers: encoder layers.
        hidden: hidden size (a multiple of ``heads``).
        heads: attention heads.
        ffn: feed-forward size.
        sequence: tokens per input (the inputs' fixed second axis).
        vocab: rows of the word-embedding table.
        positions: rows of the position-embedding table (≥ ``sequence``).

    Raises:
        ValueError: a size is not positive, ``hidden`` is not a multiple of ``heads``, or
            ``positions`` < ``sequence``.
    """

    layers: int = LAYERS
    hidden: int = HIDDEN
    heads: int = HEADS
    ffn: int = FFN
    sequence: int = SEQUENCE
    vocab: int = VOCAB
    positions: int = POSITIONS

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden, self.heads, self.ffn, self.sequence, self.vocab) < 1:
            raise ValueError("every size must be positive")
        if self.hidden % self.heads or self.positions < self.sequence:
            raise ValueError("hidden must be a multiple of heads, and positions ≥ sequence")

    @property
    def head(self) -> int:
        """Size of one attention head."""
        return self.hidden // self.heads


#: The sizes of ``all-MiniLM-L6-v2`` (what ``zoo.get("minilm")`` builds).
MINILM = MiniLMConfig()


class _Graph:
    """Nodes and seeded initializers of one model, named in order."""

    def __init__(self, seed: int, config: MiniLMConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, values: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(values, name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], std: float) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def op(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def linear(self, x: str, name: str, fan_in: int, fan_out: int) -> str:
        w = self.weight(f"{name}.weight", (fan_in, fan_out), 1 / math.sqrt(fan_in))
        b = self.const(f"{name}.bias", np.zeros(fan_out, np.float32))
        return self.op("Add", [self.op("MatMul", [x, w], f"{name}.matmul"), b], name)

    def norm(self, x: str, name: str) -> str:
        gamma = self.const(f"{name}.gamma", np.ones(self.config.hidden, np.float32))
        beta = self.const(f"{name}.beta", np.zeros(self.config.hidden, np.float32))
        return self.op("LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=1e-12)


def _layer(g: _Graph, h: str, mask: str, i: int) -> str:
    p, c = f"layer{i}", g.config
    split = g.const(f"{p}.split_shape", np.array([0, c.sequence, c.heads, c.head], np.int64))
    merge = g.const(f"{p}.merge_shape", np.array([0, c.sequence, c.hidden], np.int64))
    heads = {}
    for name in ("query", "key", "value"):
        x = g.op("Reshape", [g.linear(h, f"{p}.{name}", c.hidden, c.hidden), split], f"{p}.{name}.split")
        perm = [0, 2, 3, 1] if name == "key" else [0, 2, 1, 3]
        heads[name] = g.op("Transpose", [x], f"{p}.{name}.heads", perm=perm)
    scale = g.const(f"{p}.scale", np.array(1 / math.sqrt(c.head), np.float32))
    scores = g.op("Mul", [g.op("MatMul", [heads["query"], heads["key"]], f"{p}.scores.raw"), scale], f"{p}.scores")
    probs = g.op("Softmax", [g.op("Add", [scores, mask], f"{p}.scores.masked")], f"{p}.probs", axis=-1)
    context = g.op(
        "Transpose", [g.op("MatMul", [probs, heads["value"]], f"{p}.context")], f"{p}.context.t", perm=[0, 2, 1, 3]
    )
    attended = g.linear(g.op("Reshape", [context, merge], f"{p}.context.merged"), f"{p}.output", c.hidden, c.hidden)
    h = g.norm(g.op("Add", [attended, h], f"{p}.residual1"), f"{p}.norm1")
    up = g.linear(h, f"{p}.ffn.up", c.hidden, c.ffn)
    half, one = g.const(f"{p}.half", np.array(0.5, np.float32)), g.const(f"{p}.one", np.array(1.0, np.float32))
    root2 = g.const(f"{p}.sqrt2", np.array(math.sqrt(2.0), np.float32))
    erf = g.op("Erf", [g.op("Div", [up, root2], f"{p}.ffn.scaled")], f"{p}.ffn.erf")
    gelu = g.op(
        "Mul", [g.op("Mul", [up, half], f"{p}.ffn.half"), g.op("Add", [erf, one], f"{p}.ffn.erf1")], f"{p}.ffn.gelu"
    )
    down = g.linear(gelu, f"{p}.ffn.down", c.ffn, c.hidden)
    return g.norm(g.op("Add", [down, h], f"{p}.residual2"), f"{p}.norm2")


def minilm(seed: int = 0, config: MiniLMConfig = MINILM) -> onnx.ModelProto:
    """Build the encoder (a fresh ``ModelProto``; the same seed and config give a byte-identical model).

    Args:
        seed: weight seed.
        config: the sizes (default: those of ``all-MiniLM-L6-v2``).

    Returns:
        The ONNX model: ``input_ids``, ``attention_mask`` → ``last_hidden_state``, ``sentence_embedding``.
    """
    c = config
    g = _Graph(seed, c)
    words = g.weight("embeddings.word", (c.vocab, c.hidden), 0.02)
    positions = g.weight("embeddings.position", (c.positions, c.hidden), 0.02)
    position_ids = g.const("embeddings.position_ids", np.arange(c.sequence, dtype=np.int64))
    embedded = g.op(
        "Add",
        [
            g.op("Gather", [words, "input_ids"], "embeddings.words"),
            g.op("Gather", [positions, position_ids], "embeddings.positions"),
        ],
        "embeddings.sum",
    )
    h = g.norm(embedded, "embeddings.norm")
    keep = g.op("Cast", ["attention_mask"], "mask.float", to=TensorProto.FLOAT)
    one = g.const("mask.one", np.array(1.0, np.float32))
    blocked = g.op(
        "Mul",
        [g.op("Sub", [one, keep], "mask.blocked"), g.const("mask.big", np.array(-10000.0, np.float32))],
        "mask.bias",
    )
    mask = g.op("Unsqueeze", [blocked, g.const("mask.axes", np.array([1, 2], np.int64))], "mask.heads")
    for i in range(c.layers):
        h = _layer(g, h, mask, i)
    hidden = g.op("Identity", [h], "last_hidden_state")
    weights = g.op("Unsqueeze", [keep, g.const("pool.axes", np.array([2], np.int64))], "pool.weights")
    total = g.op(
        "ReduceSum",
        [g.op("Mul", [hidden, weights], "pool.masked"), g.const("pool.seq", np.array([1], np.int64))],
        "pool.sum",
        keepdims=0,
    )
    count = g.op("ReduceSum", [keep, g.const("pool.seq2", np.array([1], np.int64))], "pool.count", keepdims=1)
    g.op("Div", [total, g.op("Max", [count, one], "pool.count.safe")], "sentence_embedding")
    ids = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["N", c.sequence]) for n in ("input_ids", "attention_mask")
    ]
    outputs = [
        helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", c.sequence, c.hidden]),
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["N", c.hidden]),
    ]
    graph = helper.make_graph(g.nodes, "minilm", ids, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sealedml.zoo")
    model.ir_version = IR_VERSION
    model.doc_string = (
        f"minilm: BERT encoder, {c.layers} layers, hidden {c.hidden}, {c.heads} heads, sequence {c.sequence} "
        "(random weights)"
    )
    return model


def sample_inputs(
    batch: int = 1, seed: int = 0, config: MiniLMConfig = MINILM, kept: int | None = None
) -> dict[str, np.ndarray]:
    """A batch of random token ids with a padded attention mask.

    Args:
        batch: rows.
        seed: seed of the token ids.
        config: the encoder's sizes.
        kept: tokens the mask keeps per row (the rest is padding); default three quarters
            of the sequence.

    Returns:
        ``input_ids`` (in ``[0, vocab)``) and ``attention_mask`` (ones, then zeros), int64
        ``[batch, sequence]``.
    """
    keep = max(1, (3 * config.sequence) // 4) if kept is None else kept
    ids = np.random.default_rng(seed).integers(0, config.vocab, (batch, config.sequence)).astype(np.int64)
    mask = np.zeros((batch, config.sequence), np.int64)
    mask[:, :keep] = 1
    return {"input_ids": ids, "attention_mask": mask}
