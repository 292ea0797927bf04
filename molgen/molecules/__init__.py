"""3D small molecules: QM9 data, an E(3)-equivariant denoiser, EDM metrics, SDF/XYZ I/O, sampling.

Modules: ``data`` (QM9 subset and full QM9 via ``molgen[qm9]``), ``model`` (masked dense EGNN, x0 prediction),
``train`` (Lightning training, EMA, resumable), ``sampling`` (engine solvers, RDKit output), ``metrics``
(EDM stability, validity, uniqueness, novelty), ``io`` (SDF / multi-XYZ), ``reference`` (training SMILES),
``export`` (ship EMA weights with measured metrics), ``cli`` (``molgen sample|evaluate|train molecules``).
"""
