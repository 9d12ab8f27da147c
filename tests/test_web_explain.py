"""The page's explanations in a real browser (Debian's Chromium driven by Playwright, against a real uvicorn server in
a thread of the test's): draw a digit, open "Why?" and see an overlay whose strongest evidence lies on the stroke
and five nearest training digits with their labels, open "Inside" and see a layer's feature maps (and an MLP's unit
bars and weights), all asked for one request at a time.

The server's training data is a folder holding the first 2,000 real MNIST training images, so that a model's
neighbour index builds in a moment rather than over 60,000 images; and its requests wait for no build, so that the
first neighbours are refused as "being built" and the page must come back for them, as it does for a long build."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mnistlab.models.files import load_model
from mnistlab.serve import create_app
from mnistlab.serve.routers import explain as routes

from .support.browser import TIMEOUT, answer, draw_with_mouse, open_page
from .support.drawings import STROKES
from .support.mnist import write_mnist_folder
from .support.servers import AppServer

pytestmark = pytest.mark.slow  # a browser and a server

# Counts the page's explanation requests in flight, and the most there ever were at once, and notes the statuses
# of its neighbours requests.
COUNT_REQUESTS = """() => {
    window.explainRequests = { now: 0, most: 0, total: 0, neighbours: [] };
    const original = window.fetch;
    window.fetch = async (url, options) => {
        const counted = /\\/api\\/(explain|activations|neighbours)$/.test(url);
        if (counted) {
            explainRequests.now++; explainRequests.total++;
            explainRequests.most = Math.max(explainRequests.most, explainRequests.now);
        }
        try {
            const response = await original(url, options);
            if (url.endsWith("/neighbours")) explainRequests.neighbours.push(response.status);
            return response;
        } finally { if (counted) explainRequests.now--; }
    };
}"""


@pytest.fixture(scope="module")
def served(tmp_path_factory, mnist_data, small_run):
    """The web app serving the bundled model and the session's small MLP, its training data 2,000 real MNIST
    images."""
    root = tmp_path_factory.mktemp("web-explain")
    run = small_run
    write_mnist_folder(root / "data", mnist_data, 2000, 10)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MNISTLAB_DATA", str(root / "data"))
        patch.setattr(routes, "BUILD_WAIT_S", 0)
        server = AppServer(create_app([load_model(None), load_model(run)], device="cpu", workers=0, engine="torch"))
        yield server.url + "/", run.name
        server.stop()


def column(page, model: str):
    return page.locator(f'.model[data-model="{model}"]')


def explained(page, model: str) -> None:
    """Waits until the model's "Why?" maps and neighbours show the drawing as it is now."""
    for part in ("explained", "neighbours"):
        page.wait_for_function(
            f"""() => document.querySelector('.model[data-model="{model}"]').dataset.{part} === String(version)""",
            timeout=3 * TIMEOUT,
        )


def test_why_shows_evidence_on_the_stroke_and_the_nearest_training_digits(browser, served):
    url, _ = served
    context, page, errors = open_page(browser, url, viewport={"width": 1280, "height": 900})
    page.evaluate(COUNT_REQUESTS)
    draw_with_mouse(page, STROKES["7"])
    assert answer(page) == "7"
    assert page.evaluate("explainRequests.total") == 0  # nothing explained until asked

    why = page.get_by_role("button", name=re.compile(r"^Why\? bundled"))
    why.click()
    assert why.get_attribute("aria-pressed") == "true"
    explained(page, "bundled")
    body = page.evaluate("explanations.bundled")
    assert body["method"] == "integrated-gradients" and body["label"] == 7 and body["members"] == 3
    view = page.evaluate(
        """() => new Promise((resolve) => {
            const img = new Image();
            img.onload = () => {
                const c = document.createElement("canvas"); c.width = c.height = 28;
                c.getContext("2d").drawImage(img, 0, 0);
                resolve(Array.from(c.getContext("2d").getImageData(0, 0, 28, 28).data).filter((_, i) => i % 4 === 0));
            };
            img.src = "data:image/png;base64," + explanations.bundled.preprocessed;
        })"""
    )
    ink = np.array(view).reshape(28, 28) / 255
    evidence = np.array(body["attributions"][0]["map"])
    assert ink.flat[int(np.argmax(evidence))] > 0.5  # the strongest evidence for the 7 lies on its stroke
    assert evidence[ink > 0.5].sum() > np.abs(evidence[ink == 0]).sum()

    maps = column(page, "bundled").locator(".map canvas")
    assert maps.count() == 2  # the answer's and the runner-up's
    red = maps.first.evaluate(
        """(c) => { const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data; let n = 0;
                    for (let i = 0; i < d.length; i += 4) n += d[i] > 150 && d[i + 2] < 100; return n; }"""
    )
    assert red > 0  # the overlay is drawn in red over the view
    near = column(page, "bundled").locator(".neighbour")
    assert near.count() == 5
    labels = near.locator("figcaption").all_text_contents()
    assert all(label in "0123456789" and label for label in labels) and labels.count("7") >= 3
    assert all(near.locator("img").evaluate_all("(images) => images.map((i) => i.naturalWidth === 28)"))
    statuses = page.evaluate("explainRequests.neighbours")
    assert statuses[0] == 503 and statuses[-1] == 200  # told the index was being built, the page came back

    # Another method, chosen from the page's selector: explained anew, the stroke still the strongest evidence.
    page.get_by_label('"Why?" maps by').select_option("occlusion")
    page.wait_for_function("() => explanations.bundled.method === 'occlusion'", timeout=3 * TIMEOUT)

    # A new drawing while explanations are open: the maps follow it, one request at a time.
    page.click("#clear")
    draw_with_mouse(page, STROKES["1"])
    assert answer(page) == "1"
    explained(page, "bundled")
    assert page.evaluate("explanations.bundled.label") == 1
    assert page.evaluate("explainRequests.most") == 1
    assert errors == []
    context.close()


def test_inside_shows_feature_maps_and_an_mlps_units_and_weights(browser, served):
    url, mlp = served
    context, page, errors = open_page(browser, url, viewport={"width": 1280, "height": 900})
    page.evaluate(COUNT_REQUESTS)
    draw_with_mouse(page, STROKES["0"])
    assert answer(page) == "0"

    inside = page.get_by_role("button", name=re.compile(r"^Inside bundled"))
    inside.click()
    page.wait_for_function("() => document.getElementById('inside').dataset.shown === String(version)", timeout=TIMEOUT)
    assert page.locator("#inside-model").text_content() == "bundled"
    maps = page.locator('#layers .layer[data-kind="maps"]')
    assert maps.count() >= 1
    tiles = maps.first.locator("img.tile")
    assert tiles.count() >= 8
    assert all(tiles.evaluate_all("(images) => images.map((i) => i.complete && i.naturalWidth > 0)"))

    page.get_by_role("button", name=re.compile(rf"^Inside {mlp}")).click()  # one model at a time
    assert inside.get_attribute("aria-pressed") == "false"
    page.wait_for_function(
        f"() => document.getElementById('inside-model').textContent === '{mlp}' "
        "&& document.getElementById('inside').dataset.shown === String(version)",
        timeout=TIMEOUT,
    )
    units = page.locator('#layers .layer[data-kind="units"]')
    assert units.count() >= 1 and units.first.locator(".units li").count() > 0
    assert page.locator("#layers img.weight").count() > 0  # what the first layer's most active units look for

    page.get_by_role("button", name="Close the Inside panel").click()
    assert page.locator("#inside").is_hidden()
    assert page.evaluate("explainRequests.most") == 1
    assert errors == []
    context.close()
