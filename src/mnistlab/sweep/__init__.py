"""`mnistlab sweep`: search spaces as data, trials as run directories, the study on an Optuna storage."""
