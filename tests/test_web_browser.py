"""The draw-a-digit page in a real browser: Debian's Chromium driven by Playwright against a real `mnistlab serve`
(a subprocess on a free loopback port). Draws with the mouse stroke by stroke and reads the digit the page shows,
draws with a finger on a phone-sized screen without scrolling the page, uploads and drops files, checks Undo
and Clear, saves a drawing with "That was a", takes a screenshot (the README's, in docs/img/, with
MNISTLAB_SCREENSHOT=1), and keeps a Fashion-MNIST model's long class names clear of their percentages.

Without Chromium the tests skip with a one-line reason, except under CI=true, where a missing browser fails."""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterator

import pytest
from PIL import Image

from mnistlab.infer.predict import predict_images
from mnistlab.models.files import load_model

from .support.browser import TIMEOUT, answer, canvas_point, draw_with_mouse, ink, open_page
from .support.digit_images import on_paper
from .support.drawings import STROKES
from .support.mnist import REPO
from .support.runs import train_small
from .support.servers import mnistlab_serve

pytestmark = pytest.mark.slow  # a browser and a server: 15 s on 2 busy cores

# The README's screenshot is refreshed only when asked (MNISTLAB_SCREENSHOT=1), so a test run leaves the tree clean.
SCREENSHOT = REPO / "docs" / "img" / "web-app.png"


@contextlib.contextmanager
def serving(*args: str) -> Iterator[str]:
    """`mnistlab serve ARGS` on a free loopback port; yields its URL."""
    with mnistlab_serve(*args) as served:
        yield served.url


@pytest.fixture(scope="module")
def served(tmp_path_factory, mnist_data):
    """`mnistlab serve` with the bundled model and a quickly trained second model, collecting into a folder."""
    root = tmp_path_factory.mktemp("web")
    run = train_small(root / "seed-b-fixed-1-epoch-20k", mnist_data, 20000)
    collect = root / "collected"
    with serving(str(run), "--collect", str(collect)) as url:
        yield url, collect


def test_draw_with_the_mouse_undo_clear_and_collect(browser, served, tmp_path):
    url, collect = served
    context, page, errors = open_page(browser, url, viewport={"width": 1280, "height": 760})
    assert page.locator(".model h2").all_text_contents() == ["bundled", "seed-b-fixed-1-epoch-20k"]
    meaning = page.locator("#meaning").text_content()  # both calibrated: the bundled one member by member
    assert meaning.startswith("Percentages are calibrated on held-out images") and "Not calibrated" not in meaning

    draw_with_mouse(page, STROKES["1"])
    assert answer(page) == "1"
    page.click("#clear")
    assert ink(page) == 0 and page.locator(".model .digit").first.text_content() == "–"

    draw_with_mouse(page, STROKES["7"])
    assert answer(page) == "7"
    whole = ink(page)
    page.keyboard.press("Control+z")  # undo the diagonal: the bar is left
    bar = ink(page)
    assert 0 < bar < whole
    answer(page)  # answered anew
    page.focus("#undo")  # the buttons work from the keyboard
    page.keyboard.press("Enter")
    assert ink(page) == 0 and page.locator(".model .digit").first.text_content() == "–"

    draw_with_mouse(page, STROKES["7"][:1])  # the bar alone draws the very pixels the undo left
    assert ink(page) == bar
    page.keyboard.press("Escape")
    assert ink(page) == 0

    draw_with_mouse(page, STROKES["7"])
    assert answer(page) == "7"
    seen = page.evaluate("""() => { const d = document.getElementById("saw").getContext("2d")
        .getImageData(0, 0, 224, 224).data; let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] > 200;
        return n; }""")
    assert seen > 0  # the 28x28 image the models saw is drawn
    page.evaluate("document.activeElement.blur()")
    shot = SCREENSHOT if os.environ.get("MNISTLAB_SCREENSHOT") == "1" else tmp_path / "web-app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    page.get_by_role("button", name="7", exact=True).click()
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Saved as 7/')")
    assert [p.parent.name for p in collect.rglob("*.png")] == ["7"]
    assert ink(page) == 0 and errors == []
    context.close()


def touch(cdp, kind: str, x: float, y: float) -> None:
    points = [] if kind == "touchEnd" else [{"x": x, "y": y}]
    cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})


def swipe(page, cdp, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A finger put down at `start`, moved to `end` in steps, lifted: as a real touch screen reports it."""
    touch(cdp, "touchStart", *start)
    for i in range(1, 13):
        touch(cdp, "touchMove", start[0] + (end[0] - start[0]) * i / 12, start[1] + (end[1] - start[1]) * i / 12)
    touch(cdp, "touchEnd", *end)
    page.wait_for_timeout(300)  # let any scrolling (and its momentum) happen


def test_a_finger_draws_on_a_phone_without_scrolling_the_page(browser, served):
    url, _ = served
    phone = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3, "is_mobile": True, "has_touch": True}
    context, page, errors = open_page(browser, url, **phone)
    box = page.locator("#canvas").bounding_box()
    assert 280 <= box["width"] <= 390 and box["height"] == box["width"]  # at least 280 CSS px, within the phone
    assert page.evaluate("document.documentElement.scrollHeight > innerHeight + 400")  # the page could scroll
    cdp = context.new_cdp_session(page)

    (x0, y0), (x1, y1) = STROKES["1"][0]
    swipe(page, cdp, canvas_point(page, x0, y1), canvas_point(page, x1, y0))  # upwards: would scroll down
    assert page.evaluate("scrollY") == 0
    assert answer(page) == "1"

    # The same finger movement outside the canvas does scroll: the check above could have failed.
    heading = page.locator("header p").bounding_box()
    swipe(page, cdp, (heading["x"] + 20, 700), (heading["x"] + 20, 200))
    assert page.evaluate("scrollY") > 100
    assert errors == []
    context.close()


def test_upload_and_drop_an_image_file(browser, served, mnist_data, tmp_path):
    url, _ = served
    context, page, errors = open_page(browser, url, viewport={"width": 1280, "height": 760})
    photos = []
    for i in (0, 1):  # MNIST test digits 7 and 2, photographed on paper
        path = tmp_path / f"photo-{i}.jpg"
        on_paper(mnist_data.test.images[i].numpy(), seed=i).save(path, quality=85)
        photos.append((path, str(int(mnist_data.test.labels[i]))))

    page.set_input_files("#file", str(photos[0][0]))
    assert answer(page) == photos[0][1]
    assert ink(page) > 0  # the photo is shown where the drawing was

    data = base64.b64encode(photos[1][0].read_bytes()).decode()
    page.evaluate(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "photo.jpg", { type: "image/jpeg" }));
            canvas.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        data,
    )
    assert answer(page) == photos[1][1]

    (tmp_path / "notes.png").write_text("not an image")
    page.set_input_files("#file", str(tmp_path / "notes.png"))
    page.wait_for_function("() => document.getElementById('status').classList.contains('error')", timeout=TIMEOUT)
    assert "not an image" in page.locator("#status").text_content()
    assert errors == []
    context.close()


@pytest.fixture(scope="module")
def fashion_served(fashion_run, fashion_data):
    """`mnistlab serve` with the bundled model and fashion-mlp trained for one epoch on 5,000 real Fashion-MNIST
    images; with the run and the test split."""
    with serving(str(fashion_run)) as url:
        yield url, fashion_run, fashion_data.test


# The text of each label beside the text of its percentage, in one model's column: the answer's name and
# confidence, and each bar's class name and probability. Ranges measure the glyphs themselves, which may run
# outside their element's box.
TEXT_BOXES = """(column) => {
    const boxes = (element) => {
        const range = document.createRange();
        range.selectNodeContents(element);
        return [...range.getClientRects()].filter((r) => r.width > 0).map((r) => [r.left, r.top, r.right, r.bottom]);
    };
    const rows = [column.querySelector(".answer"), ...column.querySelectorAll(".bars li")];
    const pairs = rows.map((row) => [...row.querySelectorAll(".digit, .confidence, .label, .p")]);
    const c = column.getBoundingClientRect();
    return { column: [c.left, c.right], pairs: pairs.map(([a, b]) => [a.textContent, boxes(a), boxes(b)]) };
}"""


def overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_long_class_names_stay_clear_of_their_percentages(browser, fashion_served, tmp_path):
    """With a Fashion-MNIST model answering with its longest class names, no label's text touches its
    percentage and none leaves its column, in every model's column."""
    url, run, test = fashion_served
    model = load_model(run)
    longest = sorted(model.classes, key=len)[-2:]  # "Ankle boot", "T-shirt/top"
    images = []
    for name in longest:  # a test image the model calls `name`, surely enough that the page agrees
        label = model.classes.index(name)
        paths = []
        for i in (test.labels == label).nonzero().flatten()[:50].tolist():
            paths.append(tmp_path / f"{i}.png")
            Image.fromarray(test.images[i].numpy()).save(paths[-1])
        images.append(next(p.path for p in predict_images(paths, model) if p.label == label and p.confidence > 0.6))

    context, page, errors = open_page(browser, url, viewport={"width": 1280, "height": 760})
    for name, image in zip(longest, images):
        page.set_input_files("#file", image)
        page.wait_for_function("() => canvas.dataset.answered === String(version)", timeout=TIMEOUT)
        assert page.locator(f'.model[data-model="{run.name}"] .digit').text_content() == name
        for column in page.locator(".model").all():
            found = column.evaluate(TEXT_BOXES)
            left, right = found["column"]
            for label, label_boxes, share_boxes in found["pairs"]:
                assert label_boxes and all(left <= b[0] and b[2] <= right for b in label_boxes + share_boxes), label
                assert not any(overlap(a, b) for a in label_boxes for b in share_boxes), label
    assert errors == []
    context.close()
