"""Protein backbones: PDB/mmCIF I/O, equivariant backbone diffusion, AF3-style sampler, metrics."""
