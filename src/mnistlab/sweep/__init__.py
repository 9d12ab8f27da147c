"""`mnistlab sweep`: hyperparameter sweeps on Optuna, every trial an ordinary run directory, the study on an
Optuna storage that parallel processes (a journal file) or many machines (an SQL database) share.

By concept: `space` (search spaces as data), `plan` (the options and one checked plan per study), `storage`
(opening a study and reading it back), `workers` (trials and the processes that run them), `run` (running a
study: folder, workers, progress) and `report` (report.md, best.toml, plots). Kept light: `space` and `plan`
import neither Optuna nor torch, so the command line is built without them.
"""
