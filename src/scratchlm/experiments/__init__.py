"""Experiments across runs: sweeps (a grid of runs, resumable), comparison of runs, the run report."""
