"""Goodness-of-fit helpers for the distribution tests (losslessness of sampling)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def chi2_pvalue(observed, probs) -> float:
    """Chi-square goodness-of-fit p-value of ``observed`` counts against ``probs``.

    Cells of probability zero must be empty (a sample there is a hard failure,
    returned as p = 0); they are dropped before the test. float64 throughout, so
    that rounding in float32 probabilities cannot fail scipy's sum check.
    """
    observed = np.asarray(observed, dtype=np.float64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    probs = probs / probs.sum()
    zero = probs <= 0
    if observed[zero].sum() > 0:
        return 0.0
    observed, probs = observed[~zero], probs[~zero]
    if len(observed) == 1:
        return 1.0
    return float(stats.chisquare(observed, probs * observed.sum()).pvalue)
