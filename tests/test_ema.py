import math

import torch
from torch import nn

from molgen.ema import ema_update


def test_ema_warm_up_forgets_the_initial_weights():
    """With constant weights w after init w0, the EMA after n updates is w + (w0 - w) prod_k d_k, where
    d_k = min(decay, (1 + k) / (10 + k)); a plain 0.999 EMA would still hold 0.999^n of w0."""
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(0.0)
    n, decay = 200, 0.999
    for step in range(n):
        ema_update(ema, model, step, decay)
    left = math.prod(min(decay, (1 + k) / (10 + k)) for k in range(n))
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, left), rtol=1e-4)
    assert left < 1e-11 < 0.999**n


def test_ema_reaches_its_cap():
    model, ema = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(0.0)
    ema_update(ema, model, step=10**6, decay=0.9)
    assert ema.weight.item() == torch.tensor(0.9).item()
