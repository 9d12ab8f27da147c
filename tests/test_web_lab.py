"""The Train panel in a real browser: Debian's Chromium driven by Playwright against a real `mnistlab serve --runs
TMP --data-dir SMALL` (a subprocess on a free loopback port; SMALL holds 3,000 real MNIST training and 500 test
images as IDX files), whose trainings are real `mnistlab train` processes. A bad value is refused next to its
field and creates nothing; seed-b-fixed trained for 2 epochs draws its epoch points on the charts as they come,
then joins the draw-a-digit columns and answers the drawing already on the canvas; meanwhile "Find learning rate"
fills optimizer.lr; a longer run is stopped after its first epoch, resumed, and finishes.

Without Chromium the tests skip with a one-line reason, except under CI=true, where a missing browser fails."""

from __future__ import annotations

import pytest

from .support.browser import TIMEOUT, answer, draw_with_mouse, open_page
from .support.drawings import STROKES
from .support.mnist import write_mnist_folder
from .support.servers import mnistlab_serve

pytestmark = pytest.mark.slow  # a browser, a server and three trainings

TRAINING = 120_000  # ms a small training may take on 2 busy cores, its process's start included


@pytest.fixture(scope="module")
def lab(tmp_path_factory, mnist_data):
    """`mnistlab serve` with the lab on (loopback), its runs in a fresh folder, its data 3,000 real training images."""
    root = tmp_path_factory.mktemp("lab")
    data = write_mnist_folder(root / "data", mnist_data, 3000, 500)
    runs = root / "runs"
    with mnistlab_serve("--runs", str(runs), "--data-dir", str(data)) as served:
        yield served.url, runs


def field(page, key: str):
    return page.locator(f'#lab-fields [name="{key}"]')


def fill(page, values: dict[str, str]) -> None:
    """The Train form back at the config's values, then `values` typed into their fields."""
    page.click("#lab-reset")
    for key, value in values.items():
        field(page, key).fill(value)


def row(page, run: str):
    return page.locator(f'#lab-runs tr[data-run="{run}"]')


def wait_status(page, run: str, status: str) -> None:
    page.wait_for_selector(f'#lab-runs tr[data-run="{run}"][data-status="{status}"]', timeout=TRAINING)


def epochs_drawn(page, run: str) -> int:
    return int(page.locator(f'#lab-legend li[data-run="{run}"]').get_attribute("data-epochs"))


def test_train_watch_draw_stop_and_resume(browser, lab):
    url, runs = lab
    context, page, errors = open_page(browser, url, viewport={"width": 1280, "height": 900})
    page.wait_for_selector("#lab[data-ready]")
    assert page.locator("#lab-config").input_value() == "seed-b-fixed"
    assert field(page, "optimizer.lr").input_value() == "0.001"  # the config's own values
    assert field(page, "optimizer.name").evaluate("(e) => e.tagName") == "SELECT"

    # A bad value: the CLI's message beside the field it names, and nothing created.
    fill(page, {"training.epochs": "-1"})
    page.click("#lab-start")
    message = page.locator('#lab-fields [data-key="training.epochs"] .lab-field-error')
    message.wait_for(state="visible", timeout=TIMEOUT)
    assert "training.epochs" in message.text_content() and "at least 1" in message.text_content()
    assert field(page, "training.epochs").get_attribute("aria-invalid") == "true"
    assert page.locator("#lab-runs tbody tr").count() == 0
    assert not list(runs.glob("seed-b-fixed*")) and not list(runs.glob(".lab/*.json"))

    # Draw first: the model trained next answers this drawing as soon as it joins the columns.
    page.locator("#canvas").scroll_into_view_if_needed()  # the refusal scrolled the page to its field
    draw_with_mouse(page, STROKES["7"])
    assert answer(page) == "7"

    fill(page, {"training.epochs": "2", "data.val_size": "500"})
    page.click("#lab-start")
    assert message.is_hidden()  # the earlier refusal is gone
    run = "seed-b-fixed-1"
    row(page, run).wait_for(timeout=TIMEOUT)
    assert row(page, run).locator("input[type=checkbox]").is_checked()  # a started run's curves are shown

    # Meanwhile, the learning-rate finder on the same settings fills optimizer.lr and draws its curve.
    page.click("#lab-lr-find")
    page.wait_for_selector("#lr-find[data-suggested]", timeout=TRAINING)
    suggested = page.locator("#lr-find").get_attribute("data-suggested")
    assert float(suggested) > 0 and field(page, "optimizer.lr").input_value() == suggested
    assert suggested in page.locator("#lr-find-note").text_content()
    assert page.locator("#lr-find-chart canvas").count() == 1

    wait_status(page, run, "finished")
    legend = page.locator(f'#lab-legend li[data-run="{run}"]')
    legend.wait_for(timeout=TIMEOUT)
    page.wait_for_function(
        f"""() => document.querySelector('#lab-legend li[data-run="{run}"]').dataset.best !== undefined""",
        timeout=TIMEOUT,
    )
    assert epochs_drawn(page, run) == 2 and page.locator("#lab-curves").get_attribute("data-epochs") == "2"
    assert page.locator("#lab-loss canvas").count() == 1 and page.locator("#lab-acc canvas").count() == 1
    assert legend.get_attribute("data-best") in ("1", "2")
    assert row(page, run).locator(".lab-test").text_content().endswith("%")

    column = page.locator(f'.model[data-model="{run}"]')
    column.wait_for(timeout=TIMEOUT)
    assert answer(page) == "7"  # the bundled model's answer to the drawing, asked again
    assert column.locator(".digit").text_content() in list("0123456789")
    assert column.locator(".bars li.top").count() == 1

    # Stop a longer run after its first epoch (batches of 2: each epoch takes about a second, so it is stopped
    # well before its last), resume it, it finishes.
    fill(page, {"training.epochs": "8", "data.val_size": "500", "training.batch_size": "2"})
    page.click("#lab-start")
    run = "seed-b-fixed-2"
    row(page, run).wait_for(timeout=TIMEOUT)
    page.wait_for_function(
        f"""() => Number(document.querySelector('#lab-legend li[data-run="{run}"]')?.dataset.epochs) >= 1""",
        timeout=TRAINING,
    )
    row(page, run).get_by_role("button", name=f"Stop {run}").click()
    wait_status(page, run, "stopped")
    assert (runs / run / "metrics.json").is_file() and not (runs / run / "model.safetensors").exists()
    row(page, run).get_by_role("button", name=f"Resume {run}").click()
    wait_status(page, run, "finished")
    page.wait_for_function(
        f"""() => document.querySelector('#lab-legend li[data-run="{run}"]').dataset.best !== undefined""",
        timeout=TIMEOUT,
    )
    assert epochs_drawn(page, run) == 8  # the epochs before the stop and after the resume
    assert (runs / run / "model.safetensors").is_file()
    assert page.locator("#lab-legend li").count() == 2  # both runs' curves overlaid
    assert page.locator(f'.model[data-model="{run}"]').count() == 1
    assert errors == []
    context.close()


def test_the_panel_is_hidden_with_the_reason_when_the_lab_is_off(browser, tmp_path):
    with mnistlab_serve("--no-lab", "--runs", str(tmp_path / "runs")) as served:
        context, page, errors = open_page(browser, served.url, viewport={"width": 1280, "height": 900})
        note = page.locator("#lab-off")
        note.wait_for(timeout=TIMEOUT)
        assert note.text_content() == "Training from the page is off: the server was started with --no-lab"
        assert page.locator("#lab").is_hidden()
        assert errors == []
        context.close()
