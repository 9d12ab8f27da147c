"""The report's study, done from the page: a person trains networks A, B and C in the lab, fixes A with the
learning-rate finder, watches the curves side by side and draws a digit for all of them (issue 24's "done when").

Drives Debian's Chromium (Playwright) on a real `mnistlab serve --runs TMP --data-dir DIR` with the real MNIST:
seed-a, seed-b and seed-c as shipped (10 epochs each, queued one after another), then "Find learning rate" on
seed-a and Start at its suggestion; when all four have finished, a 7 drawn on the canvas. Writes the runs' figures
(as the page's run table shows them) and each column's answer into docs/lab.md, and the panel's picture into
docs/img/lab.png. About 3 minutes on 2 cores.

    .venv/bin/python benchmarks/lab_report.py [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from common import ROOT, machine, write_section
from playwright.sync_api import sync_playwright

from tests.support.browser import CHROMIUM_ARGS, answer, chromium, draw_with_mouse
from tests.support.drawings import STROKES
from tests.support.servers import mnistlab_serve

REPORT = ("seed-a", "seed-b", "seed-c")
LIMIT_MS = 900_000  # for the four trainings, on a busy 2-core machine


def cells(page, run: str) -> list[str]:
    return [c.strip() for c in page.locator(f'#lab-runs tr[data-run="{run}"] td').all_inner_texts()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("MNISTLAB_DATA"), help="where the MNIST files are")
    args = parser.parse_args()
    began = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="lab-report-") as tmp,
        mnistlab_serve("--runs", f"{tmp}/runs", *(["--data-dir", args.data_dir] if args.data_dir else [])) as served,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(served.url)
        page.wait_for_selector("#lab[data-ready]")
        for name in REPORT:  # as shipped: the report's settings, quirks and all
            page.select_option("#lab-config", name)
            page.click("#lab-start")
            page.locator(f'#lab-runs tr[data-run="{name}-1"]').wait_for()
        page.select_option("#lab-config", "seed-a")
        page.click("#lab-lr-find")
        page.wait_for_selector("#lr-find[data-suggested]", timeout=LIMIT_MS)
        suggested = page.locator("#lr-find").get_attribute("data-suggested")
        how = page.locator("#lr-find-note").text_content()
        page.click("#lab-start")
        runs = [f"{name}-1" for name in REPORT] + ["seed-a-2"]
        for run in runs:
            page.wait_for_selector(f'#lab-runs tr[data-run="{run}"][data-status="finished"]', timeout=LIMIT_MS)
            page.locator(f'.model[data-model="{run}"]').wait_for(timeout=60_000)
        page.locator("#canvas").scroll_into_view_if_needed()
        draw_with_mouse(page, STROKES["7"])
        bundled = answer(page)
        page.wait_for_timeout(500)  # every column has answered the drawing by now (one request answers them all)
        said = {run: page.locator(f'.model[data-model="{run}"] .digit').text_content() for run in runs}
        rows = {run: cells(page, run) for run in runs}
        page.locator("#lab").screenshot(path=str(ROOT / "docs" / "img" / "lab.png"))
        browser.close()
    if errors:
        raise SystemExit(f"the page reported errors: {errors}")
    minutes = (time.perf_counter() - began) / 60
    lines = [
        "Command: `.venv/bin/python benchmarks/lab_report.py` "
        f"({minutes:.1f} min, the four trainings one after another at the lab's priority)",
        f"Machine: {machine()}",
        "",
        f'Find learning rate on seed-a: "{how.strip()}" The fourth run trained at {suggested}.',
        "",
        "| run | config | learning rate | status | best val acc | test acc | training time | says for a drawn 7 |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for run in runs:
        _, config, status, val, test, seconds, *_ = rows[run]  # the first cell: the curves' checkbox
        lr = suggested if run == "seed-a-2" else "0.001 (as shipped)"
        lines.append(f"| {run} | {config} | {lr} | {status} | {val} | {test} | {seconds} | {said[run]} |")
    lines.append(f"\nThe bundled model said {bundled}. The panel afterwards, all four runs' curves overlaid:")
    lines.append("\n![the Train panel with the report's three networks and network A fixed](img/lab.png)")
    write_section("lab-report", "\n".join(lines), ROOT / "docs" / "lab.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
