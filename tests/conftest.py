"""Fixtures shared across test modules: the real local Slurm cluster (tests/slurm_fixtures.py)."""

from slurm_fixtures import cluster, slurm

__all__ = ["cluster", "slurm"]
