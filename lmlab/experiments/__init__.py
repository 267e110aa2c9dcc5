"""Experiments: many runs of the stages, compared (ablations, sweeps, ensemble training, paper studies)."""
