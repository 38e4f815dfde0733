r"""Diagnostics of the effective update: singular-value entropy, effective and stable rank,
orthogonality error (DESIGN §7).

The paper explains DoRA's gain over LoRA by the spectrum of the effective update
:math:`\Delta W_\text{eff} = W' - W` (:func:`weightcond.delta_weight`), not of :math:`BA`.
With :math:`\sigma_1 \ge \dots \ge \sigma_k \ge 0` its singular values,
:math:`k = \min(\text{out}, \text{in})`, two normalisations give two entropies:

* ``normalization="sum"``: :math:`p_i = \sigma_i / \sum_j \sigma_j` — *the* singular-value
  entropy :math:`H` of the paper, whose exponential is the effective rank;
* ``normalization="square"``: :math:`q_i = \sigma_i^2 / \sum_j \sigma_j^2` — the energy
  entropy :math:`H_2 \le H`.

Both are :math:`-\sum_i p_i \log p_i` (natural logarithm, :math:`0 \log 0 = 0`). They are
different numbers for the same matrix: every function and field below says which one it is.

The matrix functions (:func:`spectrum`, :func:`entropy`, :func:`effective_rank`,
:func:`stable_rank`, :func:`orthogonality_error`) take any real 2-D tensor ``(out, in)``
and work in float64; the layer functions (:func:`layer_report`, :func:`model_report`) apply
them to :func:`weightcond.delta_weight` and to the layer's orthogonal conditioners.

Note (round-off zeros): a matrix of exact rank :math:`r` stored in a floating dtype has
:math:`k - r` singular values of round-off size, not zero. The entropies and the effective
rank count only singular values above :math:`\max(\text{out}, \text{in})\cdot
\varepsilon\cdot\sigma_1`, with :math:`\varepsilon` the machine epsilon of the input's dtype
(``torch.linalg.matrix_rank``'s default tolerance), so that a matrix of numerical rank
:math:`r` gives :math:`H \le \log r` exactly. Each dropped value has :math:`p_i \le \delta
= \max(\text{out}, \text{in})\,\varepsilon`, so together they would add at most
:math:`k\,\delta \log(1/\delta)` to :math:`H`. :func:`spectrum` returns the raw singular
values.

Note (zero matrix): at initialisation :math:`\Delta W_\text{eff} = 0` and :math:`p` is
undefined. By convention the zero matrix has entropy ``0.0`` (both normalisations, relative
or not), effective rank ``0.0`` and stable rank ``0.0`` — the rank of the zero matrix — so
the effective rank is :math:`\exp(H)` for every nonzero matrix only. A rotation at its
identity initialisation (``sora``, ``hra``) may leave :math:`W' - W` at round-off size,
:math:`\|\Delta W_\text{eff}\|_2 \approx \varepsilon \|W\|_2`, not exactly zero; its
entropy is then that of round-off noise. No threshold hides it (one large enough to catch
it would also hide a real, early update); :attr:`LayerMetrics.relative_norm` shows it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import LayerTypeError, OptionError, ShapeError, StateError, check_bool, check_choice
from .layer import base_matrix, conditioners, delta_weight, is_conditioned, require_conditioned

__all__ = [
    "LayerMetrics",
    "effective_rank",
    "entropy",
    "layer_report",
    "model_report",
    "orthogonality_error",
    "spectrum",
    "stable_rank",
]

Normalization = Literal["sum", "square"]
_NORMALIZATIONS = ("sum", "square")


# -- the one path from a tensor to its singular values ----------------------------------------
def _as_matrix(where: str, name: str, matrix: object) -> Tensor:
    """``matrix`` detached, as float64 (on CPU if its device has no float64), or a typed error."""
    if not isinstance(matrix, Tensor):
        raise OptionError(f"{where}: argument '{name}' expected a torch.Tensor, "
                          f"got {type(matrix).__name__}")
    if matrix.is_complex():
        raise OptionError(f"{where}: argument '{name}' expected a real tensor, "
                          f"got dtype {matrix.dtype}")
    if matrix.dim() != 2:
        raise ShapeError(f"{where}: argument '{name}' expected a 2-D tensor (out, in), "
                         f"got a {matrix.dim()}-D tensor of shape {tuple(matrix.shape)}")
    if matrix.numel() == 0:
        raise ShapeError(f"{where}: argument '{name}' expected a non-empty matrix, "
                         f"got shape {tuple(matrix.shape)}")
    device = matrix.device if matrix.device.type != "mps" else torch.device("cpu")
    return matrix.detach().to(device=device, dtype=torch.float64)


def _epsilon(matrix: Tensor) -> float:
    dtype = matrix.dtype if matrix.is_floating_point() else torch.float64
    return torch.finfo(dtype).eps


def _singular_values(where: str, name: str, matrix: object) -> tuple[Tensor, Tensor]:
    """``(raw, kept)``: the float64 singular values, descending, and the same with round-off
    zeros set to zero (see Note (round-off zeros))."""
    m = _as_matrix(where, name, matrix)
    if not torch.isfinite(m).all():
        raise OptionError(f"{where}: argument '{name}' expected finite entries, "
                          f"got a matrix with inf or nan")
    s = torch.linalg.svdvals(m)
    tol = max(m.shape) * _epsilon(matrix) * s[0]  # type: ignore[arg-type]
    return s, torch.where(s > tol, s, torch.zeros_like(s))


def _entropy_of(s: Tensor, normalization: str) -> float:
    weights = s if normalization == "sum" else s**2
    total = weights.sum()
    if total == 0:  # the zero matrix, see Note (zero matrix)
        return 0.0
    return float(torch.special.entr(weights / total).sum())  # −Σ p log p, 0 log 0 = 0


def _relative(h: float, shape: torch.Size) -> float:
    k = min(shape)
    return h / math.log(k) if k > 1 else 0.0  # one singular value: H = 0


def _effective_rank_of(s: Tensor, normalization: str) -> float:
    return 0.0 if s[0] == 0 else math.exp(_entropy_of(s, normalization))


def _stable_rank_of(s: Tensor) -> float:
    return 0.0 if s[0] == 0 else float((s**2).sum() / s[0] ** 2)


def _check_normalization(where: str, normalization: object) -> str:
    return check_choice(where, "normalization", normalization, _NORMALIZATIONS)


# -- matrices ---------------------------------------------------------------------------------
def spectrum(matrix: Tensor) -> Tensor:
    r"""Return the singular values of ``matrix`` in descending order, in float64.

    .. math::

        M = U \operatorname{diag}(\sigma) V^\top, \qquad
        \sigma_1 \ge \sigma_2 \ge \dots \ge \sigma_{\min(\text{out}, \text{in})} \ge 0

    The SVD runs in float64 on the matrix's device (on the CPU for a device without float64),
    so the spectrum of a float32 or bfloat16 update is not limited by a low-precision
    factorisation. The values are raw: round-off zeros are kept (see the module's Note
    (round-off zeros)).

    Args:
        matrix: a real 2-D tensor ``(out, in)``; detached, not modified.

    Returns:
        A float64 tensor of shape ``(min(out, in),)``.

    Raises:
        weightcond.OptionError: ``matrix`` is not a real tensor, or has inf or nan entries.
        weightcond.ShapeError: ``matrix`` is not 2-D or is empty.

    Example:
        >>> import torch
        >>> from weightcond.analysis import spectrum
        >>> q = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64)).Q
        >>> m = q[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64))
        >>> s = spectrum(m)
        >>> residual = (s - torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)).abs().max()
        >>> s.dtype, tuple(s.shape), residual.item() < 1e-12
        (torch.float64, (3,), True)
    """
    return _singular_values("spectrum", "matrix", matrix)[0]


def entropy(matrix: Tensor, *, normalization: Normalization = "sum",
            relative: bool = False) -> float:
    r"""Return the singular-value entropy of ``matrix`` (natural logarithm).

    .. math::

        H = -\sum_i p_i \log p_i, \qquad
        p_i = \frac{\sigma_i}{\sum_j \sigma_j} \ (\texttt{"sum"}) \quad\text{or}\quad
        p_i = \frac{\sigma_i^2}{\sum_j \sigma_j^2} \ (\texttt{"square"}).

    ``"sum"`` is the paper's singular-value entropy :math:`H`; ``"square"`` the energy
    entropy :math:`H_2`, which weighs the large singular values more and is never higher.
    Both lie in :math:`[0, \log \operatorname{rank} M]`: 0 for a rank-1 matrix,
    :math:`\log k` for a flat spectrum of :math:`k` values. With ``relative=True`` the
    result is divided by :math:`\log \min(\text{out}, \text{in})`, giving a number in
    :math:`[0, 1]` comparable across layers of different shapes (0.0 for a matrix with one
    row or column, whose entropy is always 0). Invariant to scaling and to orthogonal
    transforms on either side.

    Round-off singular values are not counted and the zero matrix has entropy ``0.0``: see
    the module's Notes (round-off zeros) and (zero matrix).

    Args:
        matrix: a real 2-D tensor ``(out, in)``.
        normalization: ``"sum"`` (:math:`\sigma / \sum \sigma`, default) or ``"square"``
            (:math:`\sigma^2 / \sum \sigma^2`).
        relative: divide by :math:`\log \min(\text{out}, \text{in})`.

    Returns:
        :math:`H` (``"sum"``) or :math:`H_2` (``"square"``), in nats, or the same divided by
        :math:`\log \min(\text{out}, \text{in})`.

    Raises:
        weightcond.UnknownNameError: ``normalization`` is not ``"sum"`` or ``"square"``.
        weightcond.OptionError: ``relative`` is not a bool; ``matrix`` is not real or finite.
        weightcond.ShapeError: ``matrix`` is not 2-D or is empty.

    Example:
        >>> import math, torch
        >>> from weightcond.analysis import entropy
        >>> m = torch.diag(torch.tensor([3.0, 1.0, 0.0]))    # p = (3/4, 1/4, 0)
        >>> h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
        >>> abs(entropy(m) - h) < 1e-12, round(entropy(m), 4)
        (True, 0.5623)
        >>> round(entropy(torch.eye(4), relative=True), 12)   # flat spectrum: H = log 4
        1.0
    """
    _check_normalization("entropy", normalization)
    check_bool("entropy", "relative", relative)
    _, s = _singular_values("entropy", "matrix", matrix)
    h = _entropy_of(s, normalization)
    return _relative(h, matrix.shape) if relative else h


def effective_rank(matrix: Tensor, *, normalization: Normalization = "sum") -> float:
    r"""Return the effective rank of ``matrix``, the exponential of its singular-value
    entropy.

    .. math::

        \operatorname{erank}(M) = \exp(H), \qquad H = -\sum_i p_i \log p_i

    With the default ``normalization="sum"`` (:math:`p_i = \sigma_i / \sum_j \sigma_j`) this
    is the effective rank of Roy & Vetterli (2007) used in the paper; ``"square"`` gives
    :math:`\exp(H_2)` of the energy entropy instead, which is never higher. It lies between
    1 (one direction) and :math:`\operatorname{rank} M`, reaching it for a flat spectrum.
    The zero matrix has effective rank ``0.0`` (module Note (zero matrix)).

    Args:
        matrix: a real 2-D tensor ``(out, in)``.
        normalization: ``"sum"`` (default) or ``"square"``, as in :func:`entropy`.

    Returns:
        :math:`\exp(H)` (``"sum"``) or :math:`\exp(H_2)` (``"square"``).

    Raises:
        weightcond.UnknownNameError: ``normalization`` is not ``"sum"`` or ``"square"``.
        weightcond.OptionError: ``matrix`` is not real or finite.
        weightcond.ShapeError: ``matrix`` is not 2-D or is empty.

    Example:
        >>> import torch
        >>> from weightcond.analysis import effective_rank
        >>> q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
        >>> m = q[:, :4] @ torch.randn(4, 5, dtype=torch.float64)   # rank 4
        >>> 1 <= effective_rank(m) <= 4, round(effective_rank(torch.eye(6)), 10)
        (True, 6.0)
    """
    _check_normalization("effective_rank", normalization)
    _, s = _singular_values("effective_rank", "matrix", matrix)
    return _effective_rank_of(s, normalization)


def stable_rank(matrix: Tensor) -> float:
    r"""Return the stable rank of ``matrix``.

    .. math::

        \operatorname{srank}(M) = \frac{\|M\|_F^2}{\|M\|_2^2}
        = \frac{\sum_i \sigma_i^2}{\sigma_1^2}

    A continuous lower bound on the rank, :math:`1 \le \operatorname{srank} M \le
    \operatorname{rank} M`, insensitive to the small singular values (an entropy is not
    involved). The zero matrix has stable rank ``0.0`` (module Note (zero matrix)).

    Args:
        matrix: a real 2-D tensor ``(out, in)``.

    Returns:
        :math:`\|M\|_F^2 / \|M\|_2^2`.

    Raises:
        weightcond.OptionError: ``matrix`` is not real or finite.
        weightcond.ShapeError: ``matrix`` is not 2-D or is empty.

    Example:
        >>> import torch
        >>> from weightcond.analysis import stable_rank
        >>> m = torch.diag(torch.tensor([2.0, 1.0, 1.0]))    # (4 + 1 + 1) / 4
        >>> stable_rank(m)
        1.5
    """
    s, _ = _singular_values("stable_rank", "matrix", matrix)
    return _stable_rank_of(s)


def orthogonality_error(q: Tensor) -> float:
    r"""Return how far the square matrix ``q`` is from orthogonal: the largest entry of
    :math:`|Q^\top Q - I|`.

    .. math::

        e(Q) = \max_{i,j} \bigl|(Q^\top Q - I)_{ij}\bigr|

    The product is formed in float64, so the number is the error of the matrix as stored,
    not of a low-precision product. Compare it with PyTorch's bound for orthogonal
    parametrizations, :math:`10\,n\,\varepsilon` of the dtype ``q`` was computed in. No
    entropy is involved.

    Args:
        q: a real square tensor ``(n, n)``.

    Returns:
        :math:`\max_{i,j} |(Q^\top Q - I)_{ij}|`, 0 for an exactly orthogonal matrix.

    Raises:
        weightcond.OptionError: ``q`` is not a real tensor.
        weightcond.ShapeError: ``q`` is not 2-D, is empty or is not square.

    Example:
        >>> import torch
        >>> from weightcond.analysis import orthogonality_error
        >>> q = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64)).Q
        >>> orthogonality_error(q) <= 10 * 8 * torch.finfo(torch.float64).eps
        True
        >>> orthogonality_error(2 * torch.eye(3))               # QᵀQ − I = 3 I
        3.0
    """
    m = _as_matrix("orthogonality_error", "q", q)
    if m.shape[0] != m.shape[1]:
        raise ShapeError(f"orthogonality_error: argument 'q' expected a square matrix, "
                         f"got shape {tuple(m.shape)}")
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return float((m.mT @ m - eye).abs().max())


# -- layers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerMetrics:
    r"""The diagnostics of one conditioned layer, all of its effective update
    :math:`\Delta W_\text{eff} = W' - W` (:func:`weightcond.delta_weight`) except
    ``orthogonality_errors``. Returned by :func:`layer_report` and :func:`model_report`.

    Attributes:
        shape: ``(out, in)`` of :math:`\Delta W_\text{eff}`.
        update_rank: the numerical rank of :math:`\Delta W_\text{eff}` (singular values
            above the round-off tolerance of the module's Note (round-off zeros)).
        entropy: the singular-value entropy :math:`H`, normalisation ``"sum"``
            (:math:`p_i = \sigma_i / \sum_j \sigma_j`), in nats.
        energy_entropy: the energy entropy :math:`H_2`, normalisation ``"square"``
            (:math:`q_i = \sigma_i^2 / \sum_j \sigma_j^2`), in nats; never above ``entropy``.
        relative_entropy: :math:`H / \log \min(\text{out}, \text{in})` of the ``"sum"``
            entropy, in :math:`[0, 1]`.
        effective_rank: :math:`\exp(H)` of the ``"sum"`` entropy.
        stable_rank: :math:`\|\Delta W_\text{eff}\|_F^2 / \|\Delta W_\text{eff}\|_2^2`.
        relative_norm: :math:`\|\Delta W_\text{eff}\|_2 / \|W\|_2`, the size of the update
            relative to the pretrained weight (0.0 when :math:`W = 0`); a value near the
            dtype's epsilon means the other numbers describe round-off.
        orthogonality_errors: for each conditioner whose transform is exactly orthogonal
            (``transform.is_orthogonal``), :func:`orthogonality_error` of its matrix, keyed
            ``"placement.side.name"`` (e.g. ``"post.left.skew"``) in composition order; a
            second conditioner with the same key gets ``"#2"`` appended, and so on. Empty
            when the layer has none.
    """

    shape: tuple[int, int]
    update_rank: int
    entropy: float
    energy_entropy: float
    relative_entropy: float
    effective_rank: float
    stable_rank: float
    relative_norm: float
    orthogonality_errors: Mapping[str, float] = field(hash=False)


def _orthogonality_errors(layer: nn.Module) -> Mapping[str, float]:
    errors: dict[str, float] = {}
    for conditioner in conditioners(layer):
        transform = conditioner.transform
        if not transform.is_orthogonal:
            continue
        name = transform.name or type(transform).__name__
        key = f"{conditioner.placement}.{conditioner.side}.{name}"
        unique, n = key, 1
        while unique in errors:
            n += 1
            unique = f"{key}#{n}"
        errors[unique] = orthogonality_error(transform.matrix())
    return MappingProxyType(errors)


def _layer_metrics(layer: nn.Module) -> LayerMetrics:
    with torch.no_grad():
        delta = delta_weight(layer)
        raw, s = _singular_values("layer_report", "layer", delta)
        base = torch.linalg.matrix_norm(_as_matrix("layer_report", "layer", base_matrix(layer)),
                                        ord=2)
        h = _entropy_of(s, "sum")
        errors = _orthogonality_errors(layer)
    return LayerMetrics(
        shape=(delta.shape[0], delta.shape[1]),
        update_rank=int((s > 0).sum()),
        entropy=h,
        energy_entropy=_entropy_of(s, "square"),
        relative_entropy=_relative(h, delta.shape),
        effective_rank=_effective_rank_of(s, "sum"),
        stable_rank=_stable_rank_of(raw),
        relative_norm=float(raw[0] / base) if base > 0 else 0.0,
        orthogonality_errors=errors,
    )


def layer_report(layer: nn.Module) -> LayerMetrics:
    r"""Measure the effective update of one conditioned layer.

    .. math::

        \Delta W_\text{eff} = W' - W
        = L_\text{post}(L_\text{pre} W R_\text{pre} + \Delta W) R_\text{post} - W

    Computes, on :math:`\Delta W_\text{eff}` (not on :math:`BA`), the singular-value
    entropy :math:`H` (``"sum"``), the energy entropy :math:`H_2` (``"square"``), the
    relative entropy and effective rank of :math:`H`, the stable rank, the numerical rank
    and the size relative to :math:`W`; and the orthogonality error of every exactly
    orthogonal conditioner. For LoRA :math:`\Delta W_\text{eff} = sBA`, so
    ``update_rank <= r`` and :math:`H \le \log r`. Conditioning brings :math:`W`'s own
    spectrum in (DESIGN §7): a diagonal with every entry away from 1 lifts the update to
    full rank; a rotation :math:`Q` adds :math:`(Q - I)\,W`, of rank at most that of
    :math:`Q - I` (:math:`2k` for a rank-:math:`k` ``skew`` generator). At initialisation
    the update is zero and every number is ``0.0``, or round-off for a rotation (module
    Note (zero matrix)).

    Args:
        layer: a conditioned layer.

    Returns:
        Its :class:`LayerMetrics`.

    Raises:
        weightcond.LayerTypeError: ``layer`` is not an ``nn.Module``.
        weightcond.StateError: ``layer`` is not conditioned.

    Example:
        >>> import math, torch, weightcond as wc
        >>> from weightcond.analysis import layer_report
        >>> _ = torch.manual_seed(0)
        >>> layer = torch.nn.Linear(24, 32)
        >>> applied = wc.apply_preset(layer, "sora", rank=4)
        >>> with torch.no_grad():                  # stand-in for training
        ...     _ = applied.update.B.normal_(std=0.1)
        ...     for c in applied.conditioners:
        ...         for p in c.parameters():
        ...             _ = p.add_(0.05 * torch.randn_like(p))
        >>> m = layer_report(layer)
        >>> m.shape, m.update_rank, m.entropy > math.log(4), list(m.orthogonality_errors)
        ((32, 24), 24, True, ['post.left.skew'])
        >>> m.orthogonality_errors["post.left.skew"] < 10 * 32 * torch.finfo(torch.float32).eps
        True
    """
    require_conditioned(layer, "layer_report")
    return _layer_metrics(layer)


def model_report(model: nn.Module) -> dict[str, LayerMetrics]:
    r"""Measure the effective update of every conditioned layer of ``model``.

    .. math::

        \{\, \text{name} \mapsto \text{metrics}(W'_\text{name} - W_\text{name}) \,\}

    :func:`layer_report` for each submodule (``model`` itself included, under ``""``) that
    carries weightcond conditioning, in ``model.named_modules()`` order. Each value holds
    both entropies (``entropy`` is the ``"sum"`` one, ``energy_entropy`` the ``"square"``
    one); compare methods layer by layer with the same field.

    Args:
        model: a module containing conditioned layers.

    Returns:
        ``{name: LayerMetrics}``, names as in ``model.named_modules()``.

    Raises:
        weightcond.LayerTypeError: ``model`` is not an ``nn.Module``.
        weightcond.StateError: no submodule of ``model`` is conditioned.

    Example:
        >>> import math, torch, weightcond as wc
        >>> from weightcond.analysis import model_report
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(),
        ...                             torch.nn.Linear(12, 8))
        >>> _ = wc.apply_preset(model[0], "lora", rank=2)
        >>> _ = wc.apply_preset(model[2], "pre_diag", rank=2)
        >>> with torch.no_grad():
        ...     _ = wc.get_update(model[0]).B.normal_()
        ...     _ = wc.conditioners(model[2])[0].transform.scale.mul_(1.1)
        >>> report = model_report(model)
        >>> {name: m.update_rank for name, m in report.items()}
        {'0': 2, '2': 8}
        >>> report["0"].entropy <= math.log(2)
        True
    """
    if not isinstance(model, nn.Module):
        raise LayerTypeError(f"model_report: argument 'model' expected an nn.Module, "
                             f"got {type(model).__name__}")
    report = {name: _layer_metrics(m) for name, m in model.named_modules() if is_conditioned(m)}
    if not report:
        raise StateError(f"model_report: argument 'model' expected a module with at least one "
                         f"conditioned layer, got a {type(model).__name__} with none")
    return report
