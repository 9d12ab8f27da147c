"""How long the command line takes to answer when it has no model to run: `mnistlab --help`, `mnistlab configs`,
and `import mnistlab` in a fresh interpreter (the package loads torch only when a command needs it).

Run: .venv/bin/python benchmarks/cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from common import machine, write_section

COMMANDS = {
    "`mnistlab --help`": [sys.executable, "-m", "mnistlab", "--help"],
    "`mnistlab configs`": [sys.executable, "-m", "mnistlab", "configs"],
    "`mnistlab train --help`": [sys.executable, "-m", "mnistlab", "train", "--help"],
    '`python -c "import mnistlab"`': [sys.executable, "-c", "import mnistlab"],
    '`python -c "import torch"` (for scale)': [sys.executable, "-c", "import torch"],
}


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(machine())
    rows = []
    for name, argv in COMMANDS.items():
        wall(argv)  # warm the file cache
        times = [wall(argv) for _ in range(args.repeats)]
        rows.append(f"| {name} | {statistics.median(times):.3f} | {min(times):.3f}-{max(times):.3f} |")
        print(rows[-1])
    write_section(
        "cli-startup",
        f"""## Command-line start-up

Command: `.venv/bin/python benchmarks/cli_startup.py --repeats {args.repeats}`
Machine: {machine()}
Wall time of a fresh process, median of {args.repeats} (after one warm-up run). The package imports torch,
matplotlib and the rest only when a command needs them (`mnistlab/__init__.py`'s lazy names), so listing and help
answer before torch could even load.

| command | median s | range s |
|---|---|---|
"""
        + "\n".join(rows),
    )


if __name__ == "__main__":
    main()
