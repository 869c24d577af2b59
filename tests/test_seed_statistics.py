"""Spread over seeds against hand-computed answers (t quantiles from a printed table: t(0.975; 1) = 12.706,
t(0.975; 2) = 4.303)."""

import math

import pytest

from metrics.seed_statistics import paired_difference, summarize


def test_three_values_give_mean_sample_sd_and_the_t_interval():
    summary = summarize([1.0, 2.0, 3.0])
    assert summary.n == 3
    assert summary.mean == pytest.approx(2.0)
    assert summary.std == pytest.approx(1.0)  # sqrt(((1-2)^2 + 0 + (3-2)^2) / (3 - 1))
    assert summary.half_width == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)  # 2.484
    assert (summary.low, summary.high) == pytest.approx((2 - 2.484, 2 + 2.484), abs=1e-3)


def test_two_values_use_one_degree_of_freedom():
    summary = summarize([0.70, 0.80])
    assert summary.mean == pytest.approx(0.75)
    assert summary.std == pytest.approx(0.1 / math.sqrt(2))  # sqrt((0.05^2 + 0.05^2) / 1)
    assert summary.half_width == pytest.approx(12.706 * 0.05, abs=1e-3)  # 12.706 * sd / sqrt(2) = 0.635


def test_one_value_has_a_mean_but_no_spread():
    summary = summarize([0.5])
    assert (summary.n, summary.mean) == (1, 0.5)
    assert math.isnan(summary.std) and math.isnan(summary.half_width) and math.isnan(summary.low)


def test_non_finite_values_are_left_out_and_counted_in_n():
    summary = summarize([1.0, float("nan"), 3.0])
    assert (summary.n, summary.mean) == (2, 2.0)
    assert math.isnan(summarize([]).mean)


def test_paired_difference_is_b_minus_a_on_common_seeds():
    a = {42: 1.0, 43: 2.0, 44: 3.0, 45: 9.0}
    b = {42: 2.0, 43: 4.0, 44: 5.0, 46: 0.0}  # seeds 45 and 46 have no partner
    paired = paired_difference(a, b)
    assert paired.seeds == (42, 43, 44)
    assert paired.differences == (1.0, 2.0, 2.0)
    assert paired.summary.mean == pytest.approx(5 / 3)
    assert paired.summary.std == pytest.approx(math.sqrt(1 / 3))  # ((2/3)^2 + (1/3)^2 + (1/3)^2) / 2 = 1/3
    half_width = 4.303 * math.sqrt(1 / 3) / math.sqrt(3)  # 1.434
    assert paired.summary.half_width == pytest.approx(half_width, abs=1e-3)
    assert paired.exceeds_spread  # [0.232, 3.101] excludes 0
    assert paired.as_dict()["exceeds_spread"] is True


def test_a_difference_within_the_spread_or_of_unknown_spread_does_not_exceed_it():
    within = paired_difference({0: 0.80, 1: 0.70}, {0: 0.85, 1: 0.70})  # differences 0.05, 0: mean 0.025
    assert within.summary.half_width == pytest.approx(12.706 * 0.025, abs=1e-3)  # sd 0.0354, / sqrt 2 = 0.025
    assert within.summary.low < 0 < within.summary.high and not within.exceeds_spread
    single = paired_difference({0: 0.1}, {0: 0.9})
    assert single.summary.mean == pytest.approx(0.8) and not single.exceeds_spread
