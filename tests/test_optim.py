import math

import pytest

from molgen.optim import lr_factor


def test_lr_factor_warms_up_then_decays_by_cosine_to_a_tenth():
    assert [lr_factor(s, 4, 0) for s in (0, 3, 1000)] == [0.25, 1.0, 1.0]  # no decay: constant after warm-up
    assert lr_factor(3, 4, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.03)))
    assert lr_factor(50, 4, 100) == pytest.approx(0.55)  # half-way: the mean of 1 and 0.1
    assert lr_factor(100, 4, 100) == lr_factor(5000, 4, 100) == pytest.approx(0.1)


def test_lr_factor_cool_down_starts_at_decay_start():
    """Warm-up / stable / decay: full rate up to decay_start, the same cosine shifted by decay_start after."""
    assert [lr_factor(s, 10, 100, decay_start=1000) for s in (20, 999, 1000)] == [1.0, 1.0, 1.0]
    for s in (1010, 1050, 1099):
        assert lr_factor(s, 10, 100, decay_start=1000) == pytest.approx(lr_factor(s - 1000, 1, 100))
    assert lr_factor(10**6, 10, 100, floor=0.0, decay_start=1000) == 0.0
