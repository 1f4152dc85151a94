"""Schedules against hand-computed values."""
import pytest

from sparsebert.sparsity import SCHEDULES, Cubic, LRRewind, OneShot, SanhThreshold


def test_one_shot():
    s = OneShot(0.9, at=0)
    assert s.is_event(0) and not s.is_event(1)
    assert s.value_at(0) == s.value_at(50) == 0.9


def test_cubic_zhu_gupta():
    s = Cubic(initial=0.0, final=0.9, begin=10, end=20, frequency=5)
    assert [t for t in range(30) if s.is_event(t)] == [10, 15, 20]
    assert s.value_at(5) == 0.0
    assert s.value_at(10) == 0.0
    assert s.value_at(15) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert s.value_at(20) == s.value_at(29) == 0.9


def test_cubic_from_fractions_and_events():
    s = Cubic.over(0.0, 0.9, total_steps=1000, begin_frac=0.0, end_frac=0.5, events=100)
    assert (s.begin, s.end, s.frequency) == (0, 500, 5)
    assert sum(s.is_event(t) for t in range(1001)) == 101  # t = 0 is the (empty) first event


def test_sanh_threshold_warmup_cubic_cooldown():
    s = SanhThreshold(initial=0.0, final=0.9, total=100, warmup=10, cooldown=20)
    assert s.value_at(0) == s.value_at(10) == 0.0
    assert s.value_at(50) == pytest.approx(0.9 - 0.9 * (1 - 40 / 70) ** 3)
    assert s.value_at(81) == s.value_at(100) == 0.9
    assert all(s.is_event(t) for t in range(101))


def test_lr_rewind():
    s = LRRewind(total=100, rewind_at=50, warmup=5)
    assert s.multiplier(0) == pytest.approx(0.2)
    assert s.multiplier(4) == pytest.approx(1.0)
    assert s.multiplier(49) == pytest.approx(1 / 45)
    assert s.multiplier(50) == pytest.approx(1.0)  # rewound
    assert s.multiplier(75) == pytest.approx(0.5)
    assert s.multiplier(100) == 0.0


def test_registered_by_name_and_built_from_options():
    assert {"one-shot", "cubic", "sanh", "lock", "none"} <= set(SCHEDULES.names())
    options = {"sparsity": 0.9, "initial_sparsity": 0.0, "begin_frac": 0.0, "end_frac": 0.5, "events": 10}
    cubic = SCHEDULES.get("cubic").from_config(options, 100, None)
    assert cubic == Cubic(0.0, 0.9, 0, 50, 5)
