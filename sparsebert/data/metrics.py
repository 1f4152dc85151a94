"""The official GLUE metrics, from scikit-learn and SciPy: accuracy, F1 of the positive class,
Matthews correlation, Pearson and Spearman correlation. A correlation with a constant side is
undefined; it counts as 0 (no correlation), as scikit-learn does for Matthews."""
from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def accuracy(preds, labels) -> float:
    return float(skm.accuracy_score(np.asarray(labels), np.asarray(preds)))


def f1(preds, labels, positive: int = 1) -> float:
    """Binary F1 of the positive class (GLUE MRPC/QQP); 0 when there are no true positives."""
    return float(skm.f1_score(np.asarray(labels), np.asarray(preds), pos_label=positive, average="binary",
                              zero_division=0.0))


def matthews_corr(preds, labels) -> float:
    """Matthews correlation (CoLA); 0 when a marginal is constant."""
    return float(skm.matthews_corrcoef(np.asarray(labels), np.asarray(preds)))


def _correlation(fn, x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(fn(x, y).statistic)


def pearson(x, y) -> float:
    return _correlation(stats.pearsonr, x, y)


def spearman(x, y) -> float:
    """Spearman's rank correlation; ties get the mean of the ranks they span."""
    return _correlation(stats.spearmanr, x, y)


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_corr": matthews_corr,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(names: tuple[str, ...], preds, labels) -> dict[str, float]:
    return {name: METRICS[name](preds, labels) for name in names}
