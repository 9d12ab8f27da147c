"""What the tests (and the benchmarks that reuse them) share, one copy of each:

- `cli`: `mnistlab ARGS` as a user runs it, in a fresh process or in this one, and what a user error looks like.
- `mnist`: where the real MNIST lives, and slices of it.
- `runs`: small trainings, and an interrupted-then-resumed run.
- `idx_files`: small IDX files and data folders written for the data tests.
- `digit_images`, `drawings`: real MNIST test digits as people bring them (paper, scans, crops, canvases).
- `reliability_cases`: every bad input and fault, as data (also written into docs/reliability.md).
- `servers`: a real HTTP server on 127.0.0.1 serving a folder.

Benchmarks import these as `tests.support.<module>` (benchmarks/common.py puts the repository root on the path).
"""
