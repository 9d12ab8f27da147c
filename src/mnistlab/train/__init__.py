"""Training: the loop over one run state, the run directory, checkpoints and training across processes."""
