"""attn_export.compare against Polygraphy's own comparator (SimpleCompareFunc) on the same arrays.

Polygraphy is called as `polygraphy run` calls it: the candidate is the first
IterationResult, the reference the second (relative error divides by the
second). The known, documented differences (docs/comparison.md) have their
own tests below; everywhere else the verdicts must agree.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_export.compare import STATS, Tolerances, compare_arrays

polygraphy = pytest.importorskip("polygraphy")
from polygraphy.comparator import IterationResult, SimpleCompareFunc  # noqa: E402
from polygraphy.logger import G_LOGGER  # noqa: E402

# Polygraphy logs every comparison (and warns about zeros in the reference); only its failures matter here.
G_LOGGER.module_severity = G_LOGGER.CRITICAL + 1


def polygraphy_compare(ref: np.ndarray, cand: np.ndarray, tol: Tolerances, *, infinities_compare_equal: bool = True):
    """Polygraphy's result object for one output."""
    func = SimpleCompareFunc(atol=tol.atol, rtol=tol.rtol, check_error_stat=tol.stat, error_quantile=tol.quantile,
                             infinities_compare_equal=infinities_compare_equal)
    with np.errstate(invalid="ignore", over="ignore"):
        out = func(IterationResult(outputs={"o": cand}, runner_name="candidate"),
                   IterationResult(outputs={"o": ref}, runner_name="reference"))
    return out["o"]


def both(ref: np.ndarray, cand: np.ndarray, tol: Tolerances):
    with np.errstate(invalid="ignore", over="ignore"):
        ours = compare_arrays("o", ref, cand, tol)
    theirs = polygraphy_compare(ref, cand, tol)
    return ours, theirs


def _stat_pair(result, stat: str) -> tuple[float, float]:
    key = "max" if stat == "elemwise" else stat
    return getattr(result, f"{key}_absdiff"), getattr(result, f"{key}_reldiff")


# ---------------------------------------------------------------------------------------------------------------------
# near the boundary: tolerances set a few percent either side of the measured statistic
# ---------------------------------------------------------------------------------------------------------------------
FACTORS = [0.97, 1.03]


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("stat", [s for s in STATS if s != "elemwise"])
@pytest.mark.parametrize("fa", FACTORS)
@pytest.mark.parametrize("fr", FACTORS)
def test_statistic_verdicts_agree_near_the_boundary(stat: str, seed: int, dtype: str, fa: float, fr: float) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((2, 3, 8, 8)).astype(dtype)
    cand = (ref + rng.normal(0, 10.0 ** -rng.uniform(1, 4), ref.shape)).astype(dtype)
    probe = compare_arrays("o", ref, cand, Tolerances(0, 0, stat=stat))
    tol = Tolerances(atol=probe.stat_abs * fa, rtol=probe.stat_rel * fr, stat=stat)
    ours, theirs = both(ref, cand, tol)
    assert ours.passed == bool(theirs), (ours, _stat_pair(theirs, stat))
    if probe.stat_abs > 0 and probe.stat_rel > 0:  # (an FP16 median can be exactly 0: then both pass)
        assert ours.passed == (fa > 1 or fr > 1)
    pa, pr = _stat_pair(theirs, stat)
    # Polygraphy works in the outputs' dtype (FP16 in FP32) and takes means in float32; we work in float64.
    rel = 1e-12 if dtype == "float64" and stat != "mean" else 1e-5
    assert ours.stat_abs == pytest.approx(pa, rel=rel) and ours.stat_rel == pytest.approx(pr, rel=rel)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_elemwise_verdicts_agree_near_the_boundary(seed: int, dtype: str) -> None:
    # Tolerances at quantiles of the errors, so many elements exceed one tolerance and few or none both.
    rng = np.random.default_rng(100 + seed)
    ref = (rng.standard_normal(512) * 10.0 ** rng.uniform(-3, 2, 512)).astype(dtype)
    cand = (ref + rng.normal(0, 1e-3, ref.shape)).astype(dtype)
    probe = compare_arrays("o", ref, cand, Tolerances(0, 0))
    absd = np.abs(cand.astype(np.float64) - ref)
    reld = absd / np.abs(ref.astype(np.float64))
    verdicts = set()
    for qa in (0.5, 0.9, 0.99, 1.0):
        for qr in (0.5, 0.9, 0.99, 1.0):
            # Nudge off the element values themselves: float32 rounding must not decide the verdict.
            tol = Tolerances(atol=float(np.quantile(absd, qa)) * 1.0001, rtol=float(np.quantile(reld, qr)) * 1.0001)
            ours, theirs = both(ref, cand, tol)
            assert ours.passed == bool(theirs), (tol, ours.mismatched)
            verdicts.add(ours.passed)
    assert verdicts == {True, False}  # both outcomes were exercised
    theirs = polygraphy_compare(ref, cand, Tolerances(0, 0))
    assert probe.max_abs == pytest.approx(theirs.max_absdiff, rel=1e-5)
    assert probe.max_rel == pytest.approx(theirs.max_reldiff, rel=1e-5)
    assert probe.mean_abs == pytest.approx(theirs.mean_absdiff, rel=1e-5)
    assert probe.mean_rel == pytest.approx(theirs.mean_reldiff, rel=1e-5)


def test_zero_in_the_reference_gets_the_same_epsilon() -> None:
    ref = np.array([0.0, 1.0, 1e-14, -2.0])
    cand = np.array([1e-6, 1.0, 2e-14, -2.0])
    ours, theirs = both(ref, cand, Tolerances(atol=1e-4, rtol=1e-3))
    assert ours.passed and bool(theirs)
    # Same relative errors: only the exact zero gets the epsilon, the tiny non-zero value keeps its own.
    assert ours.max_rel == pytest.approx(theirs.max_reldiff, rel=1e-12)
    assert ours.mean_rel == pytest.approx(theirs.mean_reldiff, rel=1e-6)
    assert not compare_arrays("o", ref, cand, Tolerances(atol=1e-7, rtol=1e-3)).passed
    assert not bool(polygraphy_compare(ref, cand, Tolerances(atol=1e-7, rtol=1e-3)))


# ---------------------------------------------------------------------------------------------------------------------
# non-finite values
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("where,bad", [
    ("candidate", np.nan), ("candidate", np.inf), ("candidate", -np.inf),
    ("reference", np.nan), ("reference", np.inf), ("reference", -np.inf),
    ("opposite infs", np.inf),
])
def test_non_finite_on_one_side_fails_in_both(stat: str, where: str, bad: float) -> None:
    ref = np.linspace(-1, 1, 1000)
    cand = ref.copy()
    if where == "candidate":
        cand[17] = bad
    elif where == "reference":
        ref[17] = bad
    else:
        ref[17], cand[17] = np.inf, -np.inf
    tol = Tolerances(atol=1e9, rtol=1e9, stat=stat)
    ours, theirs = both(ref, cand, tol)
    assert not ours.passed
    if stat in ("median", "quantile") and not np.isnan(bad):
        # Documented difference: one Inf moves neither a median nor a 0.99 quantile of 1000 errors, so
        # Polygraphy passes it; we fail any finite/non-finite disagreement under every statistic.
        assert bool(theirs)
    else:
        assert not bool(theirs)


@pytest.mark.parametrize("stat", STATS)
def test_documented_difference_matched_infinities(stat: str) -> None:
    # Polygraphy with infinities_compare_equal passes matched Infs; we fail any non-finite reference value: a
    # reference that computes Inf there leaves nothing to check (docs/comparison.md).
    ref = np.linspace(-1, 1, 100)
    ref[3], ref[50] = np.inf, -np.inf
    cand = ref + 1e-6
    ours, theirs = both(ref, cand, Tolerances(atol=1e-5, rtol=1e-5, stat=stat))
    assert not ours.passed and bool(theirs) and ours.inf_ref == 2


@pytest.mark.parametrize("stat", STATS)
def test_documented_difference_matched_nan(stat: str) -> None:
    # The same NaN on both sides: Polygraphy fails it (NaN never compares equal, under any option), and so do
    # we, with the reason that the reference computes NaN there.
    ref = np.linspace(-1, 1, 100)
    ref[7] = np.nan
    cand = ref.copy()
    ours, theirs = both(ref, cand, Tolerances(atol=1e-5, rtol=1e-5, stat=stat))
    assert not ours.passed and ours.nan_ref == ours.nan_cand == 1 and "nothing to compare" in ours.reason
    assert not bool(theirs)


def test_documented_difference_matched_infs_in_the_mean() -> None:
    # Matched Infs: Polygraphy (infinities_compare_equal) counts them as zero error in a mean, we leave
    # them out, so our mean is over the finite elements only and can be the stricter one.
    ref = np.ones(4)
    ref[:2] = np.inf
    cand = ref.copy()
    cand[2:] += 0.015
    tol = Tolerances(atol=1e-2, rtol=1e-2, stat="mean")
    ours, theirs = both(ref, cand, tol)
    assert ours.stat_abs == pytest.approx(0.015) and theirs.mean_absdiff == pytest.approx(0.0075)
    assert not ours.passed and bool(theirs)


def test_nan_statistic_fails() -> None:
    # Found by the random test below: relative errors that overflow to Inf make np.quantile interpolate
    # Inf - Inf = NaN. Polygraphy fails a NaN statistic; ours passed it before (NaN > rtol is False).
    ref, cand = np.zeros(3), np.array([0.0, 0.0, 1e294])
    tol = Tolerances(atol=0.0, rtol=0.0, stat="quantile", quantile=1.0)
    ours, theirs = both(ref, cand, tol)
    assert np.isnan(ours.stat_rel) and not ours.passed and not bool(theirs)


# ---------------------------------------------------------------------------------------------------------------------
# random arrays, random tolerances, special values
# ---------------------------------------------------------------------------------------------------------------------
SPECIAL = st.sampled_from([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-300, 1e300])
# Polygraphy takes its means in float32, where magnitudes below ~1e-38 underflow to zero while ours (float64)
# keep them: a documented arithmetic difference, so such draws (values and noise alike) are compared as exact zeros.
def _flush_tiny(x: float) -> float:
    return 0.0 if 0 < abs(x) < 1e-30 else x


VALUE = st.one_of(st.floats(-1e3, 1e3, allow_nan=False), SPECIAL).map(_flush_tiny)
NOISE = st.one_of(st.floats(-1.0, 1.0), st.just(0.0), SPECIAL).map(_flush_tiny)
TOL = st.one_of(st.just(0.0), st.floats(1e-8, 10.0))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 24), stat=st.sampled_from(STATS), atol=TOL, rtol=TOL,
       quantile=st.floats(0.0, 1.0))
def test_random_arrays_agree(data, n: int, stat: str, atol: float, rtol: float, quantile: float) -> None:
    ref = np.array(data.draw(st.lists(VALUE, min_size=n, max_size=n)))
    noise = np.array(data.draw(st.lists(NOISE, min_size=n, max_size=n)))
    scale = data.draw(st.sampled_from([0.0, 1e-6, 1e-3, 1.0]))
    with np.errstate(invalid="ignore", over="ignore"):
        cand = np.where(np.isfinite(noise), ref + noise * scale, noise)
    tol = Tolerances(atol=atol, rtol=rtol, stat=stat, quantile=quantile)
    ours, theirs = both(ref, cand, tol)
    if not np.isfinite(ref).all():
        assert not ours.passed  # a non-finite reference always fails (documented, tested above)
        return
    if ours.nonfinite_mismatch and stat in ("median", "quantile"):
        assert not ours.passed  # stricter than Polygraphy by design (tested above)
        return
    if stat != "elemwise" and ours.nonfinite_mismatch == 0:
        pa, pr = _stat_pair(theirs, stat)
        # A statistic within rounding of its tolerance (Polygraphy's float32 means) may go either way.
        near = any(np.isfinite(v) and t > 0 and abs(v - t) <= 1e-5 * t for v, t in ((pa, atol), (pr, rtol)))
        if near:
            return
    assert ours.passed == bool(theirs), (ref, cand, tol, ours.reason, _stat_pair(theirs, stat))
