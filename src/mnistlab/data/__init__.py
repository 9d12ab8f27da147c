"""Data: IDX files, finding and downloading them, in-memory splits, augmentation, corruptions, and any image
made into a 28x28 MNIST-style digit.

Kept light: the web server's preprocessing processes import `mnistlab.data.preprocess` without torch.
"""
