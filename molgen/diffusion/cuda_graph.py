"""The whole sampling loop as one CUDA graph: captured once per input shape, replayed for every batch.

A few-step sampler on a small network is bound by kernel launches and Python, not by arithmetic. A CUDA graph
records every kernel of ``init -> run -> final`` once and replays them with a single launch. Capture needs
what the engine already guarantees (no host synchronisation inside the loop; ``check_finite`` runs after the
replay) plus static shapes, so ``GraphedSampler`` keeps one graph per (shape, dtype) of its inputs:

    loop = GraphedSampler(Sampler(model, schedule, "dpmpp_2m", steps=10, space=ZeroCoM(3)))
    x0 = loop(x_T, mask=mask, cond={"mask": mask})       # first call per shape: warm-up + capture

Inputs are copied into the graph's static buffers and the output is cloned out of them, so calls never alias.
Stochastic solvers draw from the default CUDA generator (``torch.cuda.manual_seed``), which graphs replay
with fresh offsets; a ``torch.Generator`` of one's own cannot be passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from molgen.diffusion.sampling import Sampler, State


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x_T: Tensor
    mask: Tensor | None
    cond: dict[str, Tensor]
    out: State


def _key(x_T: Tensor, mask: Tensor | None, cond: Mapping[str, Tensor]) -> tuple:
    def sig(t: Tensor | None) -> tuple | None:
        return None if t is None else (tuple(t.shape), t.dtype, t.device)

    return sig(x_T), sig(mask), tuple(sorted((k, sig(v)) for k, v in cond.items()))


class GraphedSampler:
    """``sampler``'s full loop replayed from CUDA graphs (one per input signature; ``warmup`` eager runs on a
    side stream first, which also places the memoised coefficient tables on the device)."""

    def __init__(self, sampler: Sampler, warmup: int = 2) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedSampler needs CUDA (torch.cuda.is_available() is False)")
        self.sampler, self.warmup = sampler, warmup
        self.graphs: dict[tuple, _Captured] = {}
        # graphs of one sampler share a memory pool: they never run at once, and each replay rewrites all it uses
        self.pool = torch.cuda.graph_pool_handle()

    def _loop(self, x_T: Tensor, mask: Tensor | None, cond: dict[str, Tensor]) -> State:
        s = self.sampler
        return s.final(s.run(s.init(x_T, mask=mask, cond=cond)))

    def _capture(self, x_T: Tensor, mask: Tensor | None, cond: dict[str, Tensor]) -> _Captured:
        if x_T.device.type != "cuda":
            raise ValueError(f"GraphedSampler runs on CUDA tensors, got x_T on {x_T.device}")
        x_T, cond = x_T.clone(), {k: v.clone() for k, v in cond.items()}
        mask = None if mask is None else mask.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(self.warmup):
                self._loop(x_T, mask, cond)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            out = self._loop(x_T, mask, cond)
        return _Captured(graph, x_T, mask, cond, out)

    def __call__(self, x_T: Tensor, mask: Tensor | None = None, cond: Mapping[str, Tensor] | None = None) -> Tensor:
        """The sampler's denoised output for ``x_T`` (as ``Sampler.finish(run(init(...)))``)."""
        cond = dict(cond or {})
        key = _key(x_T, mask, cond)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x_T, mask, cond)
        c = self.graphs[key]
        with torch.inference_mode():
            c.x_T.copy_(x_T)
            if mask is not None:
                c.mask.copy_(mask)
            for k, v in cond.items():
                c.cond[k].copy_(v)
            c.graph.replay()
            self.sampler.check_finite(c.out)
            return c.out.x0.clone()
