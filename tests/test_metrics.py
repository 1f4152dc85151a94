"""GLUE metrics against values computed by hand."""
import math

import numpy as np
import pytest

from sparsebert.data import metrics as M


def test_accuracy():
    assert M.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert M.accuracy(np.array([2, 2]), np.array([2, 2])) == 1.0


def test_f1_by_hand():
    # preds 1 1 0 1 0, labels 1 0 0 1 1: tp=2 fp=1 fn=1 -> precision 2/3, recall 2/3, F1 = 2/3
    assert M.f1([1, 1, 0, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)
    # tp=1 fp=2 fn=0: P=1/3 R=1 -> F1 = 2*(1/3)/(4/3) = 0.5
    assert M.f1([1, 1, 1, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
    assert M.f1([0, 0], [1, 1]) == 0.0


def test_matthews_by_hand():
    # tp=2 tn=1 fp=1 fn=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert M.matthews_corr([1, 1, 0, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(1 / 6)
    assert M.matthews_corr([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert M.matthews_corr([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert M.matthews_corr([1, 1, 1], [1, 0, 1]) == 0.0  # constant predictions


def test_pearson_by_hand():
    # x = 1 2 3, y = 2 4 7: means 2, 13/3; dx = -1 0 1, dy = -7/3 -1/3 8/3
    # sum dx*dy = 5, sum dx^2 = 2, sum dy^2 = (49+1+64)/9 = 114/9 -> r = 5 / sqrt(2 * 114/9)
    assert M.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant predictions


def test_spearman_with_ties_by_hand():
    # ranks of x = 1 2 3 4 ; y = 10 20 20 5 -> ranks 2 3.5 3.5 1
    # pearson of (1 2 3 4) and (2 3.5 3.5 1): dx = -1.5 -.5 .5 1.5; dy = -.5 1 1 -1.5
    # sum dx*dy = .75 - .5 + .5 - 2.25 = -1.5; sum dx^2 = 5; sum dy^2 = .25+1+1+2.25 = 4.5
    assert M.spearman([1, 2, 3, 4], [10, 20, 20, 5]) == pytest.approx(-1.5 / math.sqrt(5 * 4.5))
    assert M.spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)


def test_compute_names():
    out = M.compute(("accuracy", "f1"), [1, 0], [1, 1])
    assert out == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}
