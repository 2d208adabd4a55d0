"""Judging and using trained runs: restoring a run, sampling from it (``sample.py``), its
bound in bits/dim, FID/IS with the FID Inception network, the digits check, and the figures
of a run. ``python -m diffusion_jax.evaluation`` is the command line.
"""
