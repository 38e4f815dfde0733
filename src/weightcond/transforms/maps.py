r"""Maps from skew-symmetric generators to (near-)orthogonal matrices, dense and low-rank.

One convention everywhere:

.. math::

    \operatorname{cayley}(S) = (I - S/2)^{-1}(I + S/2), \qquad
    \operatorname{exp}(S) = \sum_m S^m/m!, \qquad
    \operatorname{first\_order}(S) = I + S,

which agree to first order in :math:`S`. Cayley and exp are exactly orthogonal for skew
:math:`S`; the first-order map is not (:math:`\|(I+S)h\|^2 = \|h\|^2 + \|Sh\|^2`).

**Low-rank form.** For :math:`S = P K P^\top` with :math:`P \in \mathbb{R}^{n\times 2k}` and
:math:`K` skew ``(2k, 2k)``, every map above is :math:`I + P M P^\top` with a ``(2k, 2k)``
core :math:`M` computed by :func:`lowrank_core` from :math:`K` and :math:`G = P^\top P`:

* Cayley (push-through / Woodbury): :math:`M = K (I - G K / 2)^{-1}`. :math:`GK` has purely
  imaginary eigenvalues (it is similar to a skew matrix), so the solve is always defined.
* exp: :math:`M = \varphi(KG)\,K` with :math:`\varphi(z) = (e^z - 1)/z`, read off
  ``matrix_exp([[X, I], [0, 0]])`` whose top-right block is :math:`\varphi(X)`.
* first order: :math:`M = K`.

Note (exp in float64, generators capped at 2^30): scaling and squaring squares
:math:`\log_2 \|S\|` times and each squaring doubles the error already made, so the
exponential's error grows with the generator's norm, :math:`\approx \|S\|\,\varepsilon`.
In float32 that left the dense and the low-rank maps far from orthogonal above
:math:`\|S\|_2 \approx 10^6` (measured ``max|QᵀQ - I|`` = 1.1 at 7e5, 1e8 at 7e7, NaN from
6e9 on; n = 64). Both exponentials therefore run in float64 whatever the parameters' dtype
(one small matrix per generator, cast back once), and a generator whose Frobenius norm
exceeds :data:`EXP_NORM_CAP` = :math:`2^{30}` is scaled down to that norm first (by a factor
that autograd treats as a constant): float64 keeps the error below
:math:`20\,(n + 2^{30})\,\varepsilon_{64} \approx 5 \cdot 10^{-6}` there, and the
result stays finite and orthogonal at every norm, in every dtype. Above the cap the map is
:math:`\exp(c\,S)`, not :math:`\exp(S)`: there one rounding step of a float32 parameter
already turns the rotation's angles by about 100 radians, so no dtype the parameters are
stored in determines them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import UnknownNameError

__all__ = ["DENSE_MAPS", "EXACT_MAPS", "EXP_NORM_CAP", "MAP_NAMES", "cayley", "cayley_neumann",
           "first_order", "lowrank_core", "matrix_exp", "resolve_dense_map"]

#: The largest Frobenius norm of a generator the exponential maps take as it is
#: (Note (exp in float64, generators capped at 2^30)).
EXP_NORM_CAP = 2.0**30


def _eye_like(s: Tensor) -> Tensor:
    return torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)


def cayley(s: Tensor) -> Tensor:
    r"""Dense Cayley map :math:`(I - S/2)^{-1}(I + S/2)` (batched over leading dims).

    Note (Cayley by one inverse): :math:`(I - S/2)^{-1}(I + S/2)
    = (I - S/2)^{-1}\bigl(2I - (I - S/2)\bigr) = 2(I - S/2)^{-1} - I`, so the map is one
    inverse, whose backward is two products, instead of a solve, whose backward is another
    solve. For OFT's 32 blocks of 32 on CPU, forward and backward take 1.1 ms instead of
    1.6 ms. :math:`I - S/2` has singular values :math:`\sqrt{1 + \sigma_i^2/4} \ge 1`, so
    the inverse is as well conditioned as the solve (``inv_ex``: it is invertible for every
    skew ``S``, and no error check means no host sync).
    """
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    # I - S/2 and 2 B - I as one op each: the same bits (halving and doubling are exact)
    inverse = torch.linalg.inv_ex(torch.add(eye, s, alpha=-0.5))[0]
    return torch.add(eye.neg(), inverse, alpha=2)


def cayley_neumann(s: Tensor, terms: int) -> Tensor:
    r"""Truncated Cayley–Neumann series of :func:`cayley`, term for term as PEFT's OFT
    computes it (``use_cayley_neumann=True``, ``num_cayley_neumann_terms=terms``).

    With :math:`X = S/2`, :math:`\operatorname{cayley}(S) = (I + X)(I - X)^{-1}` and
    :math:`(I - X)^{-1} = \sum_j X^j`; truncating the inverse after :math:`p` powers gives

    .. math::

        (I + X)\sum_{j=0}^{p-1} X^j = I + 2\sum_{j=1}^{p-1} X^j + X^p ,

    the last power with weight 1. PEFT 0.21 takes :math:`p = \max(\text{terms} - 1, 3)`
    for ``terms >= 3``, :math:`I + 2X` for 2 and :math:`I` for 1 (so 3 and 4 terms are the
    same series); this function does the same. Converges to :func:`cayley` for
    :math:`\|S/2\| < 1`; not exactly orthogonal. (PEFT's Neumann path applies this to the
    generator of the *inverse* of its exact path: see :func:`weightcond.from_peft`.)
    """
    half = s / 2
    out = _eye_like(s).clone()
    if terms < 2:
        return out
    if terms == 2:
        return out + 2 * half
    top = max(terms - 1, 3)
    power = half
    for _ in range(top - 1):
        out = out + 2 * power
        power = power @ half
    return out + power


def matrix_exp(s: Tensor) -> Tensor:
    """Dense matrix exponential of skew-symmetric ``s`` (batched over leading dims), computed
    in float64 with the generator capped at :data:`EXP_NORM_CAP` (Note (exp in float64,
    generators capped at 2^30)), returned in ``s``'s dtype.
    """
    s64 = s.to(torch.float64)
    s64 = s64 * _cap_factor((s64 * s64).sum((-2, -1)))[..., None, None]
    return _expm(s64).to(s.dtype)


def _cap_factor(norm_sq: Tensor) -> Tensor:
    """:math:`\\min(1, c / \\|S\\|_F)` for :math:`c` = :data:`EXP_NORM_CAP`, given
    :math:`\\|S\\|_F^2`; a constant for autograd (the norm's gradient at ``S = 0`` is 0/0)."""
    with torch.no_grad():
        return EXP_NORM_CAP / norm_sq.clamp_min(0).sqrt().clamp_min(EXP_NORM_CAP)


def _expm(s: Tensor) -> Tensor:
    """Dense matrix exponential of any square ``s`` (batched over leading dims).

    Note (singleton matrix_exp): ``torch.linalg.matrix_exp`` of a single matrix picks a
    Taylor degree from its 1-norm, and its degree-8 polynomial has a wrong coefficient
    (pytorch/pytorch#196592): a rotation by 0.5 rad comes out with error 2.5e-5 in float32
    (0.04 rad: 8e-11 in float64) instead of a few eps, and so does the orthogonality of
    ``Orthogonal``/``Block``/``Butterfly`` with ``map="exp"`` whenever one matrix is
    exponentiated alone. A batch of two or more always takes the highest-degree path, so a
    lone matrix is exponentiated next to a zero matrix (twice the work of that one call).
    :func:`lowrank_core`'s ``φ`` block (1-norm >= 1, above the degree-8 range) goes through
    here too: alone, a float32 block of 1-norm up to 1.46 takes the degree-12 polynomial, in
    a batch the degree-18 one, and one matrix and a batch of them
    (:func:`weightcond.batch_factors`) must give the same bits.
    """
    if s.shape[:-2].numel() != 1:
        return torch.linalg.matrix_exp(s)
    one = s.reshape(s.shape[-2:])
    return torch.linalg.matrix_exp(torch.stack([one, torch.zeros_like(one)]))[0].reshape(s.shape)


def first_order(s: Tensor) -> Tensor:
    """First-order map :math:`I + S` (not orthogonal)."""
    return _eye_like(s) + s


DENSE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "cayley": cayley, "exp": matrix_exp, "first_order": first_order}
EXACT_MAPS: frozenset[str] = frozenset({"cayley", "exp"})
MAP_NAMES: tuple[str, ...] = tuple(DENSE_MAPS)


def resolve_dense_map(where: str, map: str | Callable[[Tensor], Tensor],
                      extra: dict[str, Callable[[Tensor], Tensor]] | None = None
                      ) -> Callable[[Tensor], Tensor]:
    """A dense map by name (``"cayley"``, ``"exp"``, ``"first_order"`` and any ``extra``
    names) or any callable."""
    if callable(map):
        return map
    names = {**DENSE_MAPS, **(extra or {})}
    if isinstance(map, str) and map in names:
        return names[map]
    valid = ", ".join(repr(n) for n in names)
    raise UnknownNameError(f"{where}: argument 'map' expected one of {valid} or a callable, "
                      f"got {map!r}")


def _phi(x: Tensor) -> Tensor:
    """:math:`\\varphi(X) = \\sum_{m\\ge 1} X^{m-1}/m!` via one matrix exponential (batched over
    leading dims)."""
    n = x.shape[-1]
    block = x.new_zeros(*x.shape[:-2], 2 * n, 2 * n)
    block[..., :n, :n] = x
    block[..., :n, n:] = torch.eye(n, dtype=x.dtype, device=x.device)
    return _expm(block)[..., :n, n:]


def lowrank_core(k: Tensor, g: Tensor, map: str) -> Tensor:
    """The core :math:`M` with ``map(P K Pᵀ) = I + P M Pᵀ``, given ``K`` and ``G = PᵀP``
    (batched over leading dims)."""
    if map == "first_order":
        return k
    if map == "exp":  # Note (exp in float64, generators capped at 2^30)
        k64, g64 = k.to(torch.float64), g.to(torch.float64)
        x = k64 @ g64
        # ‖S‖_F² = tr(SᵀS) = -tr(S²) = -tr((KG)²) for S = P K Pᵀ: the dense map's cap
        c = _cap_factor(-(x * x.mT).sum((-2, -1)))[..., None, None]
        return (_phi(x * c) @ (k64 * c)).to(k.dtype)
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    # M (I - G K/2) = K  <=>  (I - G K/2)ᵀ Mᵀ = Kᵀ; always invertible (see above), so
    # solve_ex without its error check (which would sync with the device)
    return torch.linalg.solve_ex((eye - g @ k / 2).mT, k.mT)[0].mT
