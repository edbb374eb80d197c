"""The exact McNemar test against hand-computed binomial tails."""

from __future__ import annotations

import pytest

from diffprobe.errors import InputError
from diffprobe.metrics.stats import mcnemar_exact


def test_mcnemar_counts_only_discordant_pairs():
    # 3 pairs both right, 2 both wrong (ignored); 1 only A right, 7 only B right.
    a = [True] * 3 + [False] * 2 + [True] + [False] * 7
    b = [True] * 3 + [False] * 2 + [False] + [True] * 7
    result = mcnemar_exact(a, b)
    assert (result["n_pairs"], result["a_only"], result["b_only"]) == (13, 1, 7)
    # two-sided: 2 * P(X >= 7 | n=8, 1/2) = 2 * (8 + 1) / 256
    assert result["p"] == pytest.approx(18 / 256)


def test_mcnemar_all_one_side_and_no_discordance():
    assert mcnemar_exact([False] * 6, [True] * 6)["p"] == pytest.approx(2 / 64)
    assert mcnemar_exact([True, False], [True, False])["p"] == 1.0


def test_mcnemar_refuses_unpaired_lists():
    with pytest.raises(InputError, match="equally long"):
        mcnemar_exact([True, False], [True])
