"""Accuracy intervals and the paired student-vs-teacher test (``eval.oracle_stats``), checked
against scipy's independent implementations."""

import pytest
from scipy.stats import binomtest

from eval.oracle_stats import mcnemar_exact_p, paired_comparison, wilson_interval


@pytest.mark.parametrize("successes, n", [(184, 200), (195, 200), (0, 10), (10, 10), (1, 1),
                                          (37, 90)])
@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_wilson_interval_matches_scipy(successes, n, confidence):
    expected = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    low, high = wilson_interval(successes, n, confidence)
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert 0.0 <= low <= successes / n <= high <= 1.0


@pytest.mark.parametrize("only_a, only_b", [(5, 11), (11, 5), (0, 7), (3, 3), (1, 0), (40, 22)])
def test_mcnemar_exact_is_scipys_binomial_test_on_the_discordant_prompts(only_a, only_b):
    expected = binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact_p(only_a, only_b) == pytest.approx(expected, rel=1e-12)


def test_no_discordant_prompts_mean_no_evidence():
    assert mcnemar_exact_p(0, 0) == 1.0


def test_paired_comparison_counts_only_the_prompts_that_differ():
    a = [True, True, False, True, False, True, True, False]
    b = [True, False, True, True, False, False, False, False]
    got = paired_comparison(a, b)
    assert (got["n"], got["only_a"], got["only_b"]) == (8, 3, 1)
    assert got["difference"] == pytest.approx(sum(a) / 8 - sum(b) / 8)
    assert got["p_value"] == pytest.approx(binomtest(3, 4, 0.5).pvalue)


@pytest.mark.parametrize("call, named", [
    (lambda: wilson_interval(5, 4), "successes=5, n=4"),
    (lambda: wilson_interval(0, 0), "n=0"),
    (lambda: wilson_interval(1, 2, 1.0), "confidence=1.0"),
    (lambda: mcnemar_exact_p(-1, 2), "-1"),
    (lambda: paired_comparison([True], [True, False]), "got 1 and 2"),
    (lambda: paired_comparison([], []), "got 0 and 0"),
])
def test_bad_input_is_refused_by_name(call, named):
    with pytest.raises(ValueError, match=named):
        call()
