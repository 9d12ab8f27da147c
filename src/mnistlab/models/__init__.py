"""Models: networks built from a config, model files, losses, optimizers, gradients, metrics and attacks."""
