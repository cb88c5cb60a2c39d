import pytest

from pipeline.config import Params
from pipeline.schedule import learning_rate, should_stop_early


def test_learning_rate_schedules():
    cfg = Params().train.model_copy(update={"lr": 1.0, "warmup_steps": 10})
    assert learning_rate(cfg, 0, 100, 1.0) == pytest.approx(0.1)
    assert learning_rate(cfg, 9, 100, 1.0) == 1.0 and learning_rate(cfg, 50, 100, 0.25) == 0.25
    for schedule in ("cosine", "linear"):
        decaying = cfg.model_copy(update={"lr_schedule": schedule})
        rates = [learning_rate(decaying, step, 100, 1.0) for step in range(100)]
        assert rates[9] == 1.0 and rates[99] < 0.03 and all(a >= b for a, b in zip(rates[9:], rates[10:]))
        assert learning_rate(decaying, 100, 100, 1.0) == 0.0  # past the planned end


def test_early_stopping_rides_out_single_dips_and_stops_on_a_plateau():
    rising_with_dips = [10, 14, 17, 15.5, 19, 20, 18.8, 18.9, 21.5, 22]  # a raw patience of 2 stops at 18.9
    assert not any(should_stop_early(rising_with_dips[:n], patience=2, window=3) for n in range(1, 11))
    plateau = [10, 14, 17, 18, 18.5, 18.2, 17.9, 18.1, 17.8]
    stops = [n for n in range(1, len(plateau) + 1) if should_stop_early(plateau[:n], patience=2, window=3)]
    assert stops and stops[0] == 8
    assert should_stop_early([5, 4, 3], patience=2, window=1)  # window 1 is the raw rule
