"""Reconstruction attacks of He, Zhang & Lee, "Model Inversion Attacks against Collaborative Inference" (ACSAC 2019).

The untrusted host sees the IR at the front cut and tries to recover the input:

* :func:`rmle` — white-box regularized maximum likelihood: knowing the front net, gradient
  descent (Adam) on a candidate input x′ minimizing ‖f(x′) − IR‖² + λ_TV·TV(x′) + λ₂‖x′‖²,
  started from zeros and kept inside the input's range (paper §4.1);
* :func:`inverse_network` — black-box: a decoder IR → x trained with pixel MSE on the attacker's
  auxiliary inputs and their IRs (as if it could query the front), applied to the test IRs (§4.2);
* :func:`train_shadow` + :func:`rmle` — query-free: without the front's weights or any query, a
  shadow front of the same architecture is trained on the auxiliary data with its labels,
  through the *frozen* rest of the model (cross-entropy), then inverted like the real one (§4.3).

The feature loss of each image is divided by the IR's mean square, so one λ_TV fits every cut
(He et al. tune λ_TV per layer instead). Everything is seeded; nothing reads the test inputs
except the scoring done by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from sealedml.partition.assess.torch_graph import OnnxModule, reinitialize

__all__ = ["ATTACKS", "AttackSettings", "inverse_network", "rmle", "train_shadow"]

#: The attacks, in report order: white-box rMLE, black-box inverse network, query-free shadow.
ATTACKS: tuple[str, ...] = ("rmle", "inverse", "query_free")


@dataclass(frozen=True)
class AttackSettings:
    """The attacks' parameters (defaults: what the docs' measured table used).

    Attributes:
        rmle_iterations: Adam steps of rMLE (white-box and against the shadow).
        rmle_lr: rMLE's step size, as a fraction of the input's value range.
        tv_weight: λ_TV, weight of the total variation (mean squared neighbour difference).
        l2_weight: λ₂, weight of the mean square of x′ (0: off).
        inverse_steps: Adam steps (minibatches) training the inverse network.
        inverse_hidden: width of its two hidden layers.
        shadow_steps: Adam steps training the shadow front.
        batch: minibatch size of both trainings.
    """

    rmle_iterations: int = 300
    rmle_lr: float = 0.05
    tv_weight: float = 0.01
    l2_weight: float = 0.0
    inverse_steps: int = 800
    inverse_hidden: int = 256
    shadow_steps: int = 300
    batch: int = 64

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0 or (name in ("rmle_lr", "inverse_hidden", "batch") and value <= 0):
                raise ValueError(f"{name} must be positive, not {value}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a dict."""
        return asdict(self)


def _tensor(array: np.ndarray, dtype: Any = np.float32) -> torch.Tensor:
    # A copy: the caller's arrays may be read-only views (the zoo's splits), which torch must not alias.
    return torch.from_numpy(np.array(array, dtype=dtype, copy=True))


def _backward(loss: torch.Tensor) -> None:
    untyped: Any = loss  # Tensor.backward has no annotations
    untyped.backward()


def _tensors(arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
    return [_tensor(a) for a in arrays]


def _outputs(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = module(x)
    return list(out) if isinstance(out, tuple) else [out]


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per image: mean squared difference between vertical and horizontal neighbours."""
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).flatten(1).mean(1)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).flatten(1).mean(1)
    return dy + dx


def rmle(
    front: torch.nn.Module,
    targets: Sequence[np.ndarray],
    sample_shape: tuple[int, ...],
    value_range: tuple[float, float],
    settings: AttackSettings,
) -> np.ndarray:
    """Regularized MLE: the inputs x′ whose front outputs best match ``targets``.

    Args:
        front: a differentiable front net (the real one, or a shadow), inputs → the cut's tensors.
        targets: the observed IRs, one array per cut tensor, batch first.
        sample_shape: ``(C, H, W)`` of one input.
        value_range: ``(low, high)``; x′ starts at 0 clipped into it and stays inside.
        settings: iterations, step size and regularization weights.

    Returns:
        The reconstructions, float32 ``[n, C, H, W]``.
    """
    low, high = value_range
    wanted = _tensors(targets)
    n = len(wanted[0])
    scales = [t.flatten(1).pow(2).mean(1).clamp_min(1e-8) for t in wanted]
    start = min(max(0.0, low), high)
    x = torch.full((n, *sample_shape), start, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=settings.rmle_lr * (high - low), amsgrad=True)
    for param in front.parameters():
        param.requires_grad_(False)
    for _ in range(settings.rmle_iterations):
        optimizer.zero_grad()
        got = _outputs(front, x)
        terms = [((g - w).flatten(1).pow(2).mean(1) / s).sum() for g, w, s in zip(got, wanted, scales, strict=True)]
        loss = torch.stack(terms).sum() + settings.tv_weight * _total_variation(x).sum()
        if settings.l2_weight:
            loss = loss + settings.l2_weight * x.flatten(1).pow(2).mean(1).sum()
        _backward(loss)
        optimizer.step()
        with torch.no_grad():
            x.clamp_(low, high)
    return x.detach().numpy().copy()


def _flat_standardized(train: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    a = np.concatenate([t.reshape(len(t), -1) for t in train], axis=1).astype(np.float32)
    b = np.concatenate([t.reshape(len(t), -1) for t in test], axis=1).astype(np.float32)
    mean, std = a.mean(0), a.std(0)
    std[std == 0] = 1.0
    return torch.from_numpy((a - mean) / std), torch.from_numpy((b - mean) / std)


def inverse_network(
    ir_aux: Sequence[np.ndarray],
    x_aux: np.ndarray,
    ir_test: Sequence[np.ndarray],
    value_range: tuple[float, float],
    settings: AttackSettings,
    seed: int,
) -> np.ndarray:
    """Black-box inversion: an MLP decoder IR → x trained on the auxiliary pairs, applied to the test IRs.

    Args:
        ir_aux: the cut's tensors on the auxiliary inputs.
        x_aux: the auxiliary inputs ``[m, C, H, W]``.
        ir_test: the cut's tensors on the test inputs (what the host sees).
        value_range: ``(low, high)``: the decoder's sigmoid output is scaled to it.
        settings: steps, width, minibatch size.
        seed: seed of the initialization and of the minibatches.

    Returns:
        The reconstructions of the test inputs, float32 ``[n, C, H, W]``.
    """
    low, high = value_range
    features, queries = _flat_standardized(ir_aux, ir_test)
    targets = _tensor(x_aux).flatten(1)
    torch.manual_seed(seed)
    width = settings.inverse_hidden
    decoder = torch.nn.Sequential(
        torch.nn.Linear(features.shape[1], width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, targets.shape[1]),
        torch.nn.Sigmoid(),
    )
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.inverse_steps):
        batch = torch.randint(0, len(features), (min(settings.batch, len(features)),), generator=generator)
        predicted = decoder(features[batch]) * (high - low) + low
        loss = (predicted - targets[batch]).pow(2).mean()
        optimizer.zero_grad()
        _backward(loss)
        optimizer.step()
    with torch.no_grad():
        out = decoder(queries) * (high - low) + low
    return np.asarray(out.numpy().reshape(len(queries), *x_aux.shape[1:]), dtype=np.float32)


def train_shadow(
    front: OnnxModule,
    rest: OnnxModule,
    x_aux: np.ndarray,
    y_aux: np.ndarray,
    *,
    probabilities: bool,
    settings: AttackSettings,
    seed: int,
) -> tuple[OnnxModule, float]:
    """Query-free: a shadow front (the front's architecture, fresh weights) trained through the frozen rest.

    Args:
        front: the real front, translated; it is re-initialized in place (pass a fresh translation).
        rest: the model from the cut to its output, translated; frozen here.
        x_aux: the auxiliary inputs.
        y_aux: their labels.
        probabilities: whether the model's output is already a class distribution (else logits).
        settings: steps and minibatch size.
        seed: seed of the initialization and of the minibatches.

    Returns:
        The trained shadow front, and the accuracy of shadow + rest on the auxiliary data
        (how well the shadow stands in for the real front).
    """
    shadow = reinitialize(front, seed)
    for param in rest.parameters():
        param.requires_grad_(False)
    inputs, labels = _tensor(x_aux), _tensor(y_aux, np.int64)
    optimizer = torch.optim.Adam(shadow.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)

    def logits(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = rest(*_outputs(shadow, x))
        out = out[0] if isinstance(out, tuple) else out
        return torch.log(out.clamp_min(1e-12)) if probabilities else out

    shadow.train()
    for _ in range(settings.shadow_steps):
        batch = torch.randint(0, len(inputs), (min(settings.batch, len(inputs)),), generator=generator)
        loss = torch.nn.functional.cross_entropy(logits(inputs[batch]), labels[batch])
        optimizer.zero_grad()
        _backward(loss)
        optimizer.step()
    shadow.eval()
    with torch.no_grad():
        accuracy = float((logits(inputs).argmax(1) == labels).float().mean())
    return shadow, accuracy
