"""Output comparison: error statistics and Polygraphy's pass rule.

Pass rule (Polygraphy's ``SimpleCompareFunc``, formerly ``CompareFunc.simple``): a value fails only when it
exceeds BOTH ``atol`` and ``rtol``.

* ``elemwise``: an element mismatches when (absdiff > atol or NaN) and
  (reldiff > rtol or NaN); the output passes when no element mismatches.
* ``max``, ``mean``, ``median``, ``quantile``: the statistic of absdiff and
  of reldiff over all elements; the output fails when stat(abs) > atol and
  stat(rel) > rtol.

On top of that, and under every statistic, a non-finite value (NaN or Inf)
in the candidate where the reference is finite always fails: a mean over a
large output could otherwise hide it. The error statistics are computed over
the elements where both outputs are finite.

Relative error divides by |reference|; exact zeros in the reference are
replaced by a tiny epsilon (:data:`REL_EPS`, the float64 machine epsilon, as
Polygraphy does) so they give a large but finite relative error and the
absolute tolerance decides for them.

Where this differs from Polygraphy (checked against its comparator in
``tests/test_compare_polygraphy.py``; see docs/comparison.md): the same
non-finite value on both sides (NaN and NaN, or Inf and Inf of the same sign)
is not an error here and is left out of the statistics, where Polygraphy
fails every NaN and, with ``infinities_compare_equal``, counts matched Infs
as zero error; a NaN/Inf on one side only fails here under every statistic,
where a Polygraphy median or quantile it does not move passes; and the statistics are computed in float64, where Polygraphy
uses the outputs' dtype (and float32 for means).

Default tolerances (:func:`default_tolerances`), printed and overridable:

* fp32 artifacts: atol 1e-4, rtol 1e-3, ``elemwise``. Our FP32 exports match
  PyTorch to about 3e-6, so this leaves 30x headroom for reduction-order
  differences while still catching one wrong weight.
* fp16 / mixed artifacts: atol 1e-2, rtol 1e-2, ``mean``: NVIDIA's own
  guidance for FP16 engines (``polygraphy run --atol 1e-2 --rtol 1e-2
  --check-error-stat mean``), since Polygraphy's 1e-5 elementwise default
  gives false FAILs at FP16. A mean can hide a few large local errors; the
  table still shows max and p99 errors, and ``--stat quantile`` (level 0.99)
  is the stricter option.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import UsageError

STATS = ("elemwise", "max", "mean", "median", "quantile")
# Polygraphy's epsilon for zeros in the reference (np.finfo(np.float64).eps).
REL_EPS = float(np.finfo(np.float64).eps)
P99 = 0.99


@dataclass(frozen=True)
class Tolerances:
    """The tolerances and statistic a comparison uses."""

    atol: float
    rtol: float
    stat: str = "elemwise"
    quantile: float = P99

    def describe(self) -> str:
        """One line such as 'atol 1e-04, rtol 1e-03, statistic elemwise'."""
        stat = f"quantile {self.quantile:g}" if self.stat == "quantile" else self.stat
        return f"atol {self.atol:.0e}, rtol {self.rtol:.0e}, statistic {stat} (fails only where both are exceeded)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS: dict[str, Tolerances] = {
    "fp32": Tolerances(atol=1e-4, rtol=1e-3, stat="elemwise"),
    "fp16": Tolerances(atol=1e-2, rtol=1e-2, stat="mean"),
}


def default_tolerances(precision: str | None) -> Tolerances:
    """Default tolerances for an artifact precision: 'fp32', else the FP16 ones (fp16, bf16, mixed)."""
    return DEFAULTS["fp32"] if (precision or "fp32") == "fp32" else DEFAULTS["fp16"]


def resolve_tolerances(precision: str | None, *, atol: float | None = None, rtol: float | None = None,
                       stat: str | None = None, quantile: float | None = None) -> Tolerances:
    """Defaults for ``precision`` with the user's overrides applied; UsageError on bad values."""
    base = default_tolerances(precision)
    tol = Tolerances(
        atol=base.atol if atol is None else float(atol),
        rtol=base.rtol if rtol is None else float(rtol),
        stat=base.stat if stat is None else stat.lower(),
        quantile=base.quantile if quantile is None else float(quantile),
    )
    if tol.stat not in STATS:
        raise UsageError(f"--stat must be one of {', '.join(STATS)} (got {stat!r})")
    for name, value in (("--atol", tol.atol), ("--rtol", tol.rtol)):
        if not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"{name} must be a finite number >= 0 (got {value})")
    if not 0.0 <= tol.quantile <= 1.0:
        raise UsageError(f"--quantile must be between 0 and 1 (got {tol.quantile})")
    return tol


@dataclass
class OutputComparison:
    """Every figure of one output compared at one shape."""

    name: str
    shape: list[int]
    reference_shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    p99_abs: float
    p99_rel: float
    cosine: float
    nan_ref: int
    inf_ref: int
    nan_cand: int
    inf_cand: int
    # Elements whose finiteness differs between the outputs (NaN/Inf in one only, or Infs of opposite sign).
    nonfinite_mismatch: int
    # Elements failing the elementwise rule (reported under every statistic, for orientation).
    mismatched: int
    size: int
    # The chosen statistic of absdiff and reldiff (for elemwise: their maxima).
    stat_abs: float
    stat_rel: float
    # Polygraphy's "minimum required tolerance": the atol that passes on its own (rtol 0) OR the rtol that does.
    min_atol: float
    min_rtol: float
    passed: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: json_number(v) for k, v in asdict(self).items()}


def json_number(value: Any) -> Any:
    """Floats as JSON allows them: NaN and +-Inf become the strings 'nan', 'inf', '-inf'."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _stat(values: np.ndarray, tol: Tolerances) -> float:
    if values.size == 0:
        return 0.0
    if tol.stat in ("elemwise", "max"):
        return float(values.max())
    if tol.stat == "mean":
        return float(values.mean())
    if tol.stat == "median":
        return float(np.median(values))
    return float(np.quantile(values, tol.quantile))


def _exceeds(value: float, tol: float) -> bool:
    return math.isnan(value) or value > tol


def elemwise_mismatch(absdiff: np.ndarray, reldiff: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """Boolean mask of elements that exceed both tolerances (NaN counts as exceeding)."""
    over_abs = (absdiff > atol) | np.isnan(absdiff)
    over_rel = (reldiff > rtol) | np.isnan(reldiff)
    return over_abs & over_rel


def _nonfinite_mismatch(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    rf, cf = np.isfinite(ref), np.isfinite(cand)
    differ = rf != cf
    both = ~rf & ~cf
    # Both non-finite: equal only if both NaN, or both Inf of the same sign.
    same = (np.isnan(ref) & np.isnan(cand)) | (np.isinf(ref) & np.isinf(cand) & (np.sign(ref) == np.sign(cand)))
    return differ | (both & ~same)


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, tol: Tolerances) -> OutputComparison:
    """Compare one candidate output with its reference under ``tol`` (see the module doc for the rule)."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    nan = lambda a: int(np.isnan(a).sum())  # noqa: E731
    inf = lambda a: int(np.isinf(a).sum())  # noqa: E731
    if ref.shape != cand.shape:
        inf_f = float("inf")
        return OutputComparison(
            name=name, shape=list(cand.shape), reference_shape=list(ref.shape), max_abs=inf_f, mean_abs=inf_f,
            max_rel=inf_f, mean_rel=inf_f, p99_abs=inf_f, p99_rel=inf_f, cosine=0.0, nan_ref=nan(ref), inf_ref=inf(ref),
            nan_cand=nan(cand), inf_cand=inf(cand), nonfinite_mismatch=0, mismatched=int(cand.size), size=int(cand.size),
            stat_abs=inf_f, stat_rel=inf_f, min_atol=inf_f, min_rtol=inf_f, passed=False,
            reason=f"shape {list(cand.shape)} differs from the reference's {list(ref.shape)}",
        )
    bad_finite = _nonfinite_mismatch(ref, cand)
    n_bad_finite = int(bad_finite.sum())
    both_finite = np.isfinite(ref) & np.isfinite(cand)
    r, c = ref[both_finite], cand[both_finite]
    absdiff = np.abs(c - r)
    # Only exact zeros get the epsilon: a tiny non-zero reference keeps its own (huge) relative error.
    reldiff = absdiff / np.where(r == 0.0, REL_EPS, np.abs(r))
    empty = absdiff.size == 0
    mismatch = elemwise_mismatch(absdiff, reldiff, tol.atol, tol.rtol)
    n_mismatch = int(mismatch.sum()) + n_bad_finite

    stat_abs, stat_rel = _stat(absdiff, tol), _stat(reldiff, tol)
    if tol.stat == "elemwise":
        ok_values = not mismatch.any()
    else:
        # A NaN statistic counts as exceeding (as in Polygraphy): np.quantile over huge relative errors that
        # overflowed to Inf interpolates Inf - Inf = NaN, which must not pass.
        ok_values = not (_exceeds(stat_abs, tol.atol) and _exceeds(stat_rel, tol.rtol))
    # A NaN or Inf the reference itself computes leaves nothing to compare there: matching it proves nothing.
    ref_nonfinite = nan(ref) + inf(ref)
    passed = ok_values and n_bad_finite == 0 and ref_nonfinite == 0
    reasons = []
    if ref_nonfinite:
        reasons.append(f"the reference holds {nan(ref)} NaN and {inf(ref)} Inf of {ref.size} values: nothing to "
                       "compare there (inputs outside what the model computes? see --input-range)")
    if n_bad_finite:
        reasons.append(f"{n_bad_finite} non-finite value(s) where the other output is finite "
                       f"(candidate: {nan(cand)} NaN, {inf(cand)} Inf; reference: {nan(ref)} NaN, {inf(ref)} Inf)")
    if not ok_values:
        if tol.stat == "elemwise":
            reasons.append(f"{int(mismatch.sum())} of {absdiff.size} elements exceed both atol {tol.atol:g} and rtol {tol.rtol:g}")
        else:
            reasons.append(f"{tol.stat} abs error {stat_abs:.3g} > atol {tol.atol:g} and rel error {stat_rel:.3g} > rtol {tol.rtol:g}")

    norm = float(np.linalg.norm(r) * np.linalg.norm(c))
    if empty:
        cosine = float("nan")
    elif norm == 0.0:
        cosine = 1.0 if not absdiff.any() else 0.0
    else:
        cosine = float(np.dot(r.ravel(), c.ravel()) / norm)
    inf_f = float("inf")
    return OutputComparison(
        name=name, shape=list(cand.shape), reference_shape=list(ref.shape),
        max_abs=0.0 if empty else float(absdiff.max()), mean_abs=0.0 if empty else float(absdiff.mean()),
        max_rel=0.0 if empty else float(reldiff.max()), mean_rel=0.0 if empty else float(reldiff.mean()),
        p99_abs=0.0 if empty else float(np.quantile(absdiff, P99)),
        p99_rel=0.0 if empty else float(np.quantile(reldiff, P99)),
        cosine=cosine, nan_ref=nan(ref), inf_ref=inf(ref), nan_cand=nan(cand), inf_cand=inf(cand),
        nonfinite_mismatch=n_bad_finite, mismatched=n_mismatch, size=int(cand.size),
        stat_abs=stat_abs, stat_rel=stat_rel,
        # No tolerance forgives a NaN/Inf where the reference is finite.
        min_atol=inf_f if n_bad_finite else stat_abs, min_rtol=inf_f if n_bad_finite else stat_rel,
        passed=passed, reason="; ".join(reasons),
    )


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], tol: Tolerances,
                    names: list[str] | None = None) -> list[OutputComparison]:
    """Compare every named output (default: the reference's); a missing candidate output fails."""
    out = []
    for name in names or list(reference):
        if name not in candidate:
            inf_f = float("inf")
            ref = np.asarray(reference[name])
            out.append(OutputComparison(
                name=name, shape=[], reference_shape=list(ref.shape), max_abs=inf_f, mean_abs=inf_f, max_rel=inf_f,
                mean_rel=inf_f, p99_abs=inf_f, p99_rel=inf_f, cosine=0.0, nan_ref=0, inf_ref=0, nan_cand=0, inf_cand=0,
                nonfinite_mismatch=0, mismatched=int(ref.size), size=int(ref.size), stat_abs=inf_f, stat_rel=inf_f,
                min_atol=inf_f, min_rtol=inf_f, passed=False,
                reason=f"candidate has no output {name!r} (it has {', '.join(candidate) or 'none'})",
            ))
            continue
        out.append(compare_arrays(name, reference[name], candidate[name], tol))
    return out
