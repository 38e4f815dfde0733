"""The statistics of a sweep: Student-t intervals over seeds and paired t-tests.

Pure Python (no SciPy): Student's t distribution through the regularized incomplete beta
function (a continued fraction, Numerical Recipes §6.4), its quantiles by bisection.

Over :math:`n` seeds with mean :math:`\\bar x` and sample standard deviation :math:`s`, the
:math:`1-\\alpha` confidence interval of the mean is

.. math::

   \\bar x \\pm t_{1-\\alpha/2,\\,n-1}\\, s / \\sqrt{n},

and two variants trained with the same seeds are compared by the differences
:math:`d_i = a_i - b_i` of each seed (the seed fixes the head's initial values and the data
order for both): the same interval of :math:`\\bar d`, and the paired t-test's two-sided
:math:`p = P(|T_{n-1}| \\ge |\\bar d| / (s_d / \\sqrt n))`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import OptionError

__all__ = ["Interval", "Paired", "holm", "mean_interval", "paired_test", "t_cdf",
           "t_quantile"]

_EPS = 1e-15


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < _EPS:
            break
    return h


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """The regularized incomplete beta function :math:`I_x(a, b)`, given ``y = 1 - x``
    computed without cancellation."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
    """:math:`P(T \\le t)` for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise OptionError(f"t_cdf: argument 'df' expected a number > 0, got {df!r}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The ``q``-quantile of Student's t with ``df`` degrees of freedom (bisection on
    :func:`t_cdf` to machine precision)."""
    if not 0.0 < q < 1.0:
        raise OptionError(f"t_quantile: argument 'q' expected a number in (0, 1), got {q!r}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        low, high = high, 2.0 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < q:
            low = mid
        else:
            high = mid
        if high - low <= 4 * _EPS * high:
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its confidence interval ``[low, high]`` (``None`` with
    a single value); ``sd`` is the sample standard deviation (``None`` likewise)."""

    n: int
    mean: float
    low: float | None
    high: float | None
    sd: float | None
    level: float

    @property
    def half_width(self) -> float | None:
        """``(high - low) / 2``."""
        return None if self.low is None or self.high is None else (self.high - self.low) / 2


@dataclass(frozen=True)
class Paired:
    """A paired comparison of ``a`` against ``b`` over the seeds both have.

    Attributes:
        seeds: the seeds compared.
        difference: the mean of ``a - b`` and its interval.
        t: the t statistic (``None`` with one seed or when every difference is the same).
        p: the two-sided p-value of the paired t-test (``None`` with one seed).
    """

    seeds: tuple[int, ...]
    difference: Interval
    t: float | None
    p: float | None

    @property
    def resolved(self) -> bool:
        """Whether the interval of the difference excludes 0 (at its level; equivalently,
        ``p < 1 - level``)."""
        d = self.difference
        return d.low is not None and d.high is not None and (d.low > 0 or d.high < 0)


def mean_interval(values: Sequence[float], *, level: float = 0.95) -> Interval:
    """The mean of ``values`` and its Student-t confidence interval at ``level``.

    Example:
        >>> from weightcond.sweep import mean_interval
        >>> i = mean_interval([0.70, 0.74, 0.72])   # t(0.975, 2) = 4.303, s = 0.02
        >>> round(i.mean, 2), round(i.low, 4), round(i.high, 4)
        (0.72, 0.6703, 0.7697)
    """
    if not values:
        raise OptionError("mean_interval: argument 'values' expected at least one value, "
                          "got none")
    if not 0.0 < level < 1.0:
        raise OptionError(f"mean_interval: argument 'level' expected a number in (0, 1), got "
                          f"{level!r}")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(n, mean, None, None, None, level)
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half, sd, level)


def paired_test(a: Mapping[int, float], b: Mapping[int, float], *, level: float = 0.95
                ) -> Paired | None:
    """Compare ``a`` with ``b`` (each: seed → value) over their common seeds: the mean
    difference ``a - b``, its interval and the paired t-test; ``None`` without a common
    seed.

    Example:
        >>> from weightcond.sweep import paired_test
        >>> p = paired_test({0: 0.78, 1: 0.77, 2: 0.79}, {0: 0.76, 1: 0.765, 2: 0.77})
        >>> round(p.t, 6), round(p.p, 4), p.resolved   # d = (0.02, 0.005, 0.02)
        (3.0, 0.0955, False)
    """
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    interval = mean_interval(d, level=level)
    if interval.sd is None:
        return Paired(seeds, interval, None, None)
    if interval.sd == 0.0:  # every seed gives the same difference
        return Paired(seeds, interval, None, 1.0 if interval.mean == 0.0 else 0.0)
    t = interval.mean / (interval.sd / math.sqrt(len(d)))
    p = 2.0 * t_cdf(-abs(t), len(d) - 1)
    return Paired(seeds, interval, t, min(1.0, p))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (``None`` stays ``None``): the
    adjusted values control the chance of any false "resolved" in the family."""
    known = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        out[i] = running
    return out
