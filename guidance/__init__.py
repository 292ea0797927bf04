"""Guidance without gradients: SMC, Feynman-Kac correctors, SVDD, baselines and rewards."""
