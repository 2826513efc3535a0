"""The comparison protocol's statistics on synthetic inputs with known answers."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from fedlora_jax import stats


def test_bootstrap_interval_covers_the_true_mean_at_its_nominal_rate():
    rng = np.random.default_rng(0)
    trials, n, mean = 200, 20, 1.0
    covered = [lo <= mean <= hi for lo, hi in
               (stats.mean_ci(rng.exponential(mean, n), resamples=999, seed=t)[1:]
                for t in range(trials))]
    # percentile bootstrap of a skewed mean at n = 20 undercovers a little; 95% nominal
    assert 0.86 <= np.mean(covered) <= 0.99


def test_bootstrap_interval_matches_the_normal_theory_interval():
    x = np.random.default_rng(1).normal(3.0, 2.0, 400)
    est = stats.mean_ci(x)
    half = scipy_stats.norm.ppf(0.975) * x.std(ddof=1) / np.sqrt(x.size)
    assert est.mean == pytest.approx(x.mean())
    assert est.low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert est.high == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_bootstrap_along_an_axis_matches_one_column_at_a_time():
    values = np.random.default_rng(2).normal(size=(30, 4)) + np.arange(4)
    together = stats.mean_ci(values)
    for j in range(4):
        alone = stats.mean_ci(values[:, j])
        width = alone.high - alone.low
        assert together.mean[j] == pytest.approx(alone.mean)
        assert together.low[j] == pytest.approx(alone.low, abs=0.1 * width)
        assert together.high[j] == pytest.approx(alone.high, abs=0.1 * width)


def test_constant_or_single_seed_values_have_a_point_interval():
    assert stats.mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert stats.mean_ci([5.0]) == (5.0, 5.0, 5.0)


def test_misses_are_censored_at_the_budget():
    times, reached = stats.censor([1.0, np.inf, 5.0, 3.0], budget=4.0)
    np.testing.assert_array_equal(times, [1.0, 4.0, 4.0, 3.0])  # a late hit is a miss too
    np.testing.assert_array_equal(reached, [True, False, False, True])
    assert stats.mean_ci(times).mean == pytest.approx(3.0)  # the restricted mean


def test_step_curve_reading_crossing_and_area():
    t, acc = [0.0, 1.0, 3.0], [0.1, 0.5, 0.9]
    np.testing.assert_array_equal(stats.step_value(t, acc, [-1.0, 0.0, 2.9, 3.0, 10.0]),
                                  [np.nan, 0.1, 0.5, 0.9, 0.9])
    assert stats.first_crossing(t, acc, 0.5) == 1.0 and stats.first_crossing(t, acc, 0.95) == np.inf
    assert stats.area_under(t, acc, 4.0) == pytest.approx((0.1 * 1 + 0.5 * 2 + 0.9 * 1) / 4)
    assert stats.area_under(t, acc, 2.0) == pytest.approx((0.1 + 0.5) / 2)
    with pytest.raises(ValueError, match="starts at time 0"):
        stats.area_under([1.0, 2.0], [0.1, 0.2], 3.0)
    # the piecewise-linear curve's mean: trapezoids (0.1+0.5)/2 * 1 and (0.5+0.9)/2 * 2, over 3
    assert stats.curve_mean(t, acc) == pytest.approx((0.3 + 1.4) / 3)
    with pytest.raises(ValueError, match="spanning an interval"):
        stats.curve_mean([0.0], [0.5])


def test_paired_ratio_of_a_known_speedup():
    baseline = np.random.default_rng(3).uniform(1.0, 10.0, 40)
    p = stats.paired(baseline * np.exp(-0.5), baseline)
    assert p.faster == 1.0 and p.ties == 0.0
    assert p.log_ratio == pytest.approx((-0.5, -0.5, -0.5))
    assert p.ratio.mean == pytest.approx(np.exp(-0.5))


def test_paired_ratio_with_noise_and_shared_misses():
    rng = np.random.default_rng(4)
    baseline = rng.uniform(1.0, 10.0, 40)
    method = baseline * np.exp(-0.3 + rng.normal(0.0, 0.1, 40))
    budget = 12.0
    method[:4] = baseline[:4] = budget  # both missed: a tie, log ratio 0
    p = stats.paired(method, baseline)
    logs = np.log(method[4:] / baseline[4:])
    assert p.ties == pytest.approx(0.1) and p.faster == pytest.approx(np.mean(logs < 0) * 0.9)
    assert p.log_ratio.mean == pytest.approx(logs.sum() / 40)
    assert p.log_ratio.low < p.log_ratio.mean < p.log_ratio.high < 0  # faster, significantly
    with pytest.raises(ValueError, match="one value per seed"):
        stats.paired(method, baseline[:3])
