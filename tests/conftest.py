"""Test-wide settings (one intra-op thread: small tensors, shared CI cores) and helpers shared by test files."""

import torch

torch.set_num_threads(1)


def counting(model):
    """``model`` wrapped to count its calls: (wrapped, [calls])."""
    calls = [0]

    def wrapped(x, t, **cond):
        calls[0] += 1
        return model(x, t, **cond)

    wrapped.prediction = model.prediction
    return wrapped, calls
