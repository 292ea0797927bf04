"""The modality-free sampling engine: schedules, time grids, parameterisations, ODE/SDE solvers.

    x = sample(model, get_schedule("vp_cosine"), x_T, solver="dpmpp_3m", steps=10)
    moments = GaussianMoments.from_data(train_x)  # the data's mean and covariance
    x = sample(model, schedule, x_T, solver="unipc", steps=5, warm_start=moments)  # closed-form start
    x = sample(model, schedule, x_T, solver="unipc", steps=5, warm_start=moments, linear_part=moments)  # + every step
    loop = GraphedSampler(Sampler(model, schedule, "unipc", steps=5)); x = loop(x_T)  # CUDA: one graph replay
    x = sample(model, schedule, x_T, solver="ddpm_ancestral", steps=50, corrector="langevin")  # predictor-corrector
    bpd = bits_per_dim(model, schedule, x0, steps=32)  # probability-flow likelihood, bits per dimension
"""

from molgen.diffusion.analytic import GaussianMoments
from molgen.diffusion.corrector import CORRECTORS
from molgen.diffusion.cuda_graph import GraphedSampler
from molgen.diffusion.grids import GRIDS, get_grid
from molgen.diffusion.likelihood import bits_per_dim, log_likelihood, naturalness
from molgen.diffusion.parameterization import PREDICTIONS, to_x0
from molgen.diffusion.sampling import Sampler, State, sample, select
from molgen.diffusion.schedules import SCHEDULES, Schedule, get_schedule
from molgen.diffusion.solvers import SOLVERS, get_solver
from molgen.diffusion.spaces import Euclidean, ZeroCoM

__all__ = [
    "CORRECTORS", "GRIDS", "PREDICTIONS", "SCHEDULES", "SOLVERS", "Euclidean", "GaussianMoments", "GraphedSampler",
    "Sampler", "Schedule", "State", "ZeroCoM",
    "bits_per_dim", "get_grid", "get_schedule", "get_solver", "log_likelihood", "naturalness", "sample", "select",
    "to_x0",
]
