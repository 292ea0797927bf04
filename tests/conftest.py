"""Test-wide settings: one intra-op thread (small tensors; avoids oversubscription on shared CI cores)."""

import torch

torch.set_num_threads(1)
