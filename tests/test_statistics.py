"""The report's statistics against hand-computed values: sample std, paired differences and their verdict."""

from __future__ import annotations

import math

import pytest

from ast_core.statistics import PairedDifference, paired_difference, sample_std


def test_sample_std_divides_by_n_minus_one_and_is_zero_for_one_value() -> None:
    assert sample_std([70.0, 72.0, 74.0]) == pytest.approx(2.0)  # sqrt((4 + 0 + 4) / 2)
    assert sample_std([60.0, 61.0]) == pytest.approx(math.sqrt(0.5))
    assert sample_std([71.5]) == 0.0


def test_paired_difference_of_one_two_three() -> None:
    # differences 1, 2, 3: mean 2, sample std 1, t = 2 / (1 / sqrt 3) = 3.4641 on 2 dof, two-sided p = 0.0742
    difference = paired_difference([71.0, 72.0, 73.0], [70.0, 70.0, 70.0])
    assert (difference.n, difference.mean, difference.std) == (3, pytest.approx(2.0), pytest.approx(1.0))
    assert difference.p_value == pytest.approx(0.07418, abs=1e-5)
    assert difference.verdict == "not separated"


def test_a_baseline_scored_once_is_the_same_number_for_every_pair() -> None:
    assert paired_difference([71.0, 72.0, 73.0], 70.0) == paired_difference([71.0, 72.0, 73.0], [70.0] * 3)


def test_paired_difference_is_paired_not_two_sample() -> None:
    # Both sides vary a lot but their differences are 1.0, 1.1, 0.9, 1.0: mean 1, sample std sqrt(0.02 / 3),
    # t = 1 / (0.08165 / 2) = 24.49 on 3 dof, p = 1.5e-4, though the two samples overlap completely.
    difference = paired_difference([61.0, 71.1, 80.9, 66.0], [60.0, 70.0, 80.0, 65.0])
    assert difference.mean == pytest.approx(1.0)
    assert difference.std == pytest.approx(math.sqrt(0.02 / 3))
    assert difference.p_value == pytest.approx(1.49e-4, rel=0.01)
    assert difference.verdict == "separated"


def test_two_pairs_are_never_separated_however_small_p() -> None:
    # differences 1.0, 1.01: t = 1.005 / 0.005 = 201 on 1 dof, p = 0.0032 < 0.05, but only 2 seeds
    difference = paired_difference([71.0, 71.01], [70.0, 70.0])
    assert difference.p_value == pytest.approx(0.00317, rel=0.01)
    assert difference.verdict == "not separated"


@pytest.mark.parametrize(("a", "b"), [([71.0], [70.0]), ([72.0, 73.0, 74.0], [70.0, 71.0, 72.0])])
def test_no_p_value_for_one_pair_or_equal_differences(a: list[float], b: list[float]) -> None:
    difference = paired_difference(a, b)
    assert difference.mean == pytest.approx(a[0] - b[0]) and difference.std == pytest.approx(0.0)
    assert math.isnan(difference.p_value) and difference.verdict == "not separated"


def test_verdict_needs_three_pairs_and_p_below_0_05() -> None:
    assert PairedDifference(3, 1.0, 0.1, 0.049).verdict == "separated"
    assert PairedDifference(3, 1.0, 0.1, 0.05).verdict == "not separated"
    assert PairedDifference(2, 1.0, 0.1, 0.001).verdict == "not separated"


def test_no_pairs_is_an_error() -> None:
    with pytest.raises(ValueError, match="no pairs"):
        paired_difference([], [])
