"""Using a trained model: predictions on image files, evaluation, ensembles and ONNX export."""
