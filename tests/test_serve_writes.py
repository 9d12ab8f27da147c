"""Writes to `mnistlab serve` (POST /api/collect), over real HTTP on loopback: the bearer token (from the
environment, never on the command line), the per-client rate limit, the collect folder's quotas, exact labels,
CORS only for the origins named, and the page asking for the token once in a real browser."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install 'mnistlab[web]')")
import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from mnistlab.serve.auth import RateLimit
from mnistlab.serve.engines import load_served
from mnistlab.serve.images import RequestError
from mnistlab.serve.routers.collect import class_number

from .support.browser import answer, draw_with_mouse, open_page
from .support.cli import assert_user_error, mnistlab, run_main
from .support.drawings import STROKES, drawn_png
from .support.servers import mnistlab_serve

TOKEN = "s3cret-Token_for.tests~1"
LAB = "https://lab.example.org"
SEVEN = drawn_png("7")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def saved(folder: Path) -> list[str]:
    """Every file under `folder` (temporary ones too), as paths inside it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def post(url: str, headers: dict[str, str] | None = None, **fields: str) -> httpx.Response:
    files = {"image": ("drawing.png", SEVEN, "image/png")}
    return httpx.post(f"{url}api/collect", files=files, data=fields, headers=headers or {}, timeout=30)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """`mnistlab serve` collecting with a token (from MNISTLAB_TOKEN), CORS for LAB, no rate limit; and its
    folder."""
    folder = tmp_path_factory.mktemp("guarded")
    env = {**os.environ, "MNISTLAB_TOKEN": TOKEN}
    args = ("--collect", str(folder), "--cors", LAB, "--writes-per-minute", "0", "--workers", "0")
    with mnistlab_serve(*args, env=env) as served:
        yield served, folder


# ---------------------------------------------------------------------------------------------- tokens


@pytest.mark.slow  # a server
def test_writes_need_the_token_and_predictions_do_not(guarded):
    served, folder = guarded
    url = served.url
    assert TOKEN not in Path(f"/proc/{served.process.pid}/cmdline").read_text()  # not for `ps` to show

    for headers, needle in (
        ({}, "send Authorization: Bearer"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "wrong token"),
        ({"Authorization": f"Bearer {TOKEN[:-1]}"}, "wrong token"),
        ({"Authorization": f"Basic {TOKEN}"}, "send Authorization: Bearer"),
        ({"Authorization": "Bearer"}, "send Authorization: Bearer"),
    ):
        response = post(url, headers, label="7")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", headers
        assert needle in response.json()["detail"] and TOKEN not in response.text, headers
    request = urllib.request.Request(f"{url}api/collect", data=b"{}", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(refused.value.read())["detail"].startswith("writes need this server's token")
    assert saved(folder) == []

    response = post(url, {"Authorization": f"Bearer {TOKEN}"}, label="7")
    assert response.status_code == 200 and response.json()["saved"].startswith("7/")
    curl = subprocess.run(
        ["curl", "-sS", "-H", f"Authorization: bearer {TOKEN}", "-F", "image=@-;filename=d.png", "-F", "label=7",
         f"{url}api/collect"],
        input=SEVEN,
        capture_output=True,
        check=True,
        timeout=30,
    )  # fmt: skip
    assert json.loads(curl.stdout)["count"] == 2
    prediction = httpx.post(f"{url}api/predict", files={"image": ("d.png", SEVEN)}, timeout=30)
    assert prediction.status_code == 200 and prediction.json()["predictions"][0]["label"] == 7


def test_collect_beyond_loopback_needs_a_token(tmp_path):
    result = mnistlab("serve", "--host", "0.0.0.0", "--port", "0", "--collect", str(tmp_path / "c"), timeout=120)
    assert_user_error(result, "--collect on 0.0.0.0 (beyond loopback) needs --token or MNISTLAB_TOKEN")
    assert not (tmp_path / "c").exists()  # refused before anything is made


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--collect", "{tmp}/c", "--token", ""), "--token must be letters"),
        (("--token", "two words"), "--token must be letters"),
        (("--token", "caf\u00e9"), "--token must be letters"),
        (("--writes-per-minute", "-1"), "--writes-per-minute must be 0 or more, not -1"),
        (("--collect-max-files", "-5"), "--collect-max-files must be 0 or more"),
        (("--collect-max-mb", "nan"), "--collect-max-mb must be 0 or more, not nan"),
        (("--cors", "*"), "--cors '*': give an origin as scheme://host[:port]"),
        (("--cors", "https://lab.example.org/page"), "give an origin"),
    ],
)
def test_serve_refuses_bad_write_settings_in_one_line(capsys, tmp_path, flags, needle):
    argv = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    assert_user_error(run_main(capsys, "serve", "--port", "0", *argv), needle)


# ---------------------------------------------------------------------------------------------- rate and quotas


@pytest.mark.slow  # a server
def test_writes_are_limited_per_client_and_the_folder_by_files(tmp_path):
    """Two writes a minute per client address (uvicorn takes it from X-Forwarded-For when the connection comes
    from loopback, as from a reverse proxy there), then 429 with Retry-After; three files in the folder, counting
    the one there at the start, then 507 with nothing written."""
    folder = tmp_path / "collected"
    (folder / "3").mkdir(parents=True)
    (folder / "3" / "old.png").write_bytes(drawn_png("1"))
    args = ("--collect", str(folder), "--writes-per-minute", "2", "--collect-max-files", "3", "--workers", "0")
    with mnistlab_serve(*args) as served:
        first = {"X-Forwarded-For": "10.0.0.1"}
        assert [post(served.url, first, label="7").status_code for _ in range(2)] == [200, 200]
        limited = post(served.url, first, label="7")
        assert limited.status_code == 429, limited.text
        assert 1 <= int(limited.headers["retry-after"]) <= 30  # a write each 30 s comes back
        assert "too many writes from 10.0.0.1: at most 2 a minute" in limited.json()["detail"]
        before = saved(folder)
        assert len(before) == 3

        full = post(served.url, {"X-Forwarded-For": "10.0.0.2"}, label="7")  # another client: not limited
        assert full.status_code == 507, full.text
        assert "holds 3 of at most 3 files (--collect-max-files); nothing was saved" in full.json()["detail"]
        assert saved(folder) == before  # no file, no temporary file

        prediction = httpx.post(f"{served.url}api/predict", files={"image": ("d.png", SEVEN)}, headers=first)
        assert prediction.status_code == 200  # only writes are limited

        # No --cors: no CORS headers for any origin, and no preflight is answered.
        models = httpx.get(f"{served.url}api/models", headers={"Origin": LAB})
        assert models.status_code == 200 and "access-control-allow-origin" not in models.headers
        preflight = httpx.options(f"{served.url}api/collect", headers=_preflight(LAB))
        assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


@pytest.mark.slow  # a server
def test_a_drawing_past_the_megabytes_is_refused_and_not_written(tmp_path):
    folder = tmp_path / "collected"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "big.png").write_bytes(bytes(10_000))  # 0.01 MB is 10,485 bytes: no drawing fits beside it
    with mnistlab_serve("--collect", str(folder), "--collect-max-mb", "0.01", "--workers", "0") as served:
        response = httpx.post(f"{served.url}api/collect", json={"image": data_url(SEVEN), "label": 7}, timeout=30)
        assert response.status_code == 507, response.text
        detail = response.json()["detail"]
        assert "holds 0.0 MB of at most 0.01 MB" in detail and "(--collect-max-mb); nothing was saved" in detail
        assert saved(folder) == ["1/big.png"]


@given(st.lists(st.tuples(st.sampled_from("ab"), st.floats(0, 120)), max_size=60), st.integers(1, 30))
@settings(max_examples=200, deadline=None)
def test_the_rate_limit_allows_a_burst_and_then_the_rate(calls, per_minute):
    """Per client: at most `per_minute` writes at once plus `per_minute` a minute after; a refused write is told
    a wait after which the next one is allowed; clients do not share their writes."""
    limit, now = RateLimit(per_minute), 0.0
    allowed: dict[str, int] = {"a": 0, "b": 0}
    for client, step in calls:
        now += step
        wait = limit.take(client, now)
        if wait:
            retry = RateLimit(per_minute)
            retry.buckets = limit.buckets.copy()
            assert retry.take(client, now + wait + 1e-9) == 0
        else:
            allowed[client] += 1
        assert allowed[client] <= per_minute + per_minute * now / 60 + 1e-9


# ---------------------------------------------------------------------------------------------- labels


@pytest.fixture(scope="module")
def digit_and_fashion_models(fashion_run):
    return load_served([None, fashion_run], "cpu", "torch")


@pytest.mark.slow  # trains a Fashion-MNIST model
@given(st.text(max_size=12) | st.sampled_from(["7", "07", " 7", "7 ", "\u0667", "7.0", "Ankle boot", "ankle boot"]))
@settings(max_examples=200, deadline=None)
def test_a_label_is_exactly_a_class_number_or_a_served_class_name(digit_and_fashion_models, label):
    names = {name: i for i, name in enumerate(digit_and_fashion_models[1].loaded.classes)}
    expected = int(label) if label in {str(i) for i in range(10)} else names.get(label)
    try:
        assert class_number(label, digit_and_fashion_models) == expected
    except RequestError as exc:
        assert expected is None and exc.status == 400
        assert str(exc).startswith("label must be a class number from 0 to 9 or a class name ('T-shirt/top', ")
        assert " ".join(repr(label).split()) in str(exc)  # named, as the one-line message spaces it


@pytest.mark.slow  # a server
def test_labels_are_refused_naming_the_value_and_nothing_is_saved(guarded):
    served, folder = guarded
    before = saved(folder)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for label in ("07", " 7", "\u0667", "7.0", "10", "-1", "seven", ""):
        response = post(served.url, auth, label=label)
        assert response.status_code == 400, (label, response.text)
        assert f"label must be a class number from 0 to 9, not {label!r}" in response.json()["detail"]
    for label, shown in ((3.5, "'3.5'"), (True, "'true'"), (None, "'null'"), ([7], "'[7]'")):
        response = httpx.post(f"{served.url}api/collect", json={"image": data_url(SEVEN), "label": label}, headers=auth)
        assert response.status_code == 400 and response.json()["detail"].endswith(f"not {shown}"), response.text
    missing = httpx.post(f"{served.url}api/collect", json={"image": data_url(SEVEN)}, headers=auth)
    assert missing.status_code == 400 and missing.json()["detail"].endswith("and the request has none")
    assert saved(folder) == before
    for label in (7, "7"):
        response = httpx.post(f"{served.url}api/collect", json={"image": data_url(SEVEN), "label": label}, headers=auth)
        assert response.status_code == 200 and response.json()["saved"].startswith("7/")


# ---------------------------------------------------------------------------------------------- CORS


def _preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


@pytest.mark.slow  # a server
def test_cors_answers_the_named_origin_only_and_the_page_keeps_its_policy(guarded):
    url = guarded[0].url
    allowed = httpx.options(f"{url}api/collect", headers=_preflight(LAB))
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == LAB
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{url}api/collect", headers=_preflight("https://elsewhere.example"))
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert other.json() == {"detail": "CORS preflight refused: origin"}
    assert httpx.get(f"{url}api/models", headers={"Origin": LAB}).headers["access-control-allow-origin"] == LAB
    assert (
        "access-control-allow-origin"
        not in httpx.get(f"{url}api/models", headers={"Origin": "https://x.example"}).headers
    )
    page = httpx.get(url)
    assert "default-src 'self'" in page.headers["content-security-policy"]


# ---------------------------------------------------------------------------------------------- the page


@pytest.mark.slow  # a browser and a server
def test_the_page_asks_for_the_token_once_and_saves(browser, guarded):
    served, folder = guarded
    context, page, errors = open_page(browser, served.url, viewport={"width": 1280, "height": 760})
    asked: list[str] = []

    def give_token(dialog) -> None:
        asked.append(dialog.message)
        dialog.accept(TOKEN)

    page.on("dialog", give_token)
    before = len([p for p in folder.rglob("*.png") if p.parent.name == "7"])
    for n in (1, 2):
        draw_with_mouse(page, STROKES["7"])
        assert answer(page) == "7"
        page.get_by_role("button", name="7", exact=True).click()
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Saved as 7/')")
        assert len([p for p in folder.rglob("*.png") if p.parent.name == "7"]) == before + n
    assert len(asked) == 1 and "token" in asked[0]  # asked once, kept for the session
    assert page.evaluate("sessionStorage.getItem('mnistlab-token')") == TOKEN
    assert errors == []
    context.close()
