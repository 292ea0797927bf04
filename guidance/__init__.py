"""Guidance without gradients: SMC, Feynman-Kac correctors, SVDD, baselines and rewards.

Steer a pretrained diffusion model toward a reward it was never trained on, at a known model-call cost,
on the engine's step-level interface (``molgen.diffusion.Sampler`` or the masked ``DiscreteSampler``):

    from molgen.guidance.svdd import svdd_sample          # M children per step, keep one by softmax(value / alpha)
    from molgen.guidance.fk import fk_sample, Tilt, anneal, product, cfg   # FK steering and FK correctors
    from molgen.guidance.baselines import best_of_n, dps_sample
    from molgen.guidance.rewards import parse_reward      # "qed", "rna_mfe", "rna_target:((..))", "jaspar:MA0114.4"

    from molgen.guidance.completions import Completions   # value of a noisy state from K sampled completions

    res = svdd_sample(sampler, x_T, parse_reward("quadratic:c=1"), candidates=4, alpha=0.0)
    res = svdd_sample(sampler, x_T, reward, candidates=4, value=Completions(copies=2, steps=2))  # calls counted
    res.samples, res.rewards, res.model_calls, res.summary()

Modules: ``smc`` (weights, ESS, resampling), ``engine`` (continuous / discrete step adapter), ``fk``,
``svdd``, ``baselines``, ``rewards``, ``core`` (accounting, results), ``value`` (SVDD-MC value nets),
``completions`` (values from sampled completions, for SVDD and FK tilting),
``tasks`` (molecules, RNA, DNA and backbones as guidance problems: ``guide(problem, method, reward, n)``),
``train_value`` (``python -m molgen.guidance.train_value``: the recorded value-net recipe), ``cli`` (``molgen guide``).
"""
