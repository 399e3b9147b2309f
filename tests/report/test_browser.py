"""The HTML reports as a reader sees them: opened in a real headless Chromium, over HTTP.

Usage::

    pytest -q tests/report/test_browser.py     # needs /usr/bin/chromium (apt-get install chromium)
    CLLORA_CHROMIUM=/opt/chrome/chrome pytest -q tests/report/test_browser.py   # another browser

A tiny run's report and a tiny sweep's report (tiny random Llama, builtin corpus, a few seconds
of training) are served from their directory on 127.0.0.1, as a user opening them would load
them, and opened at a laptop's width (1280 px) and at a phone's (360 px). Each must render (its
title and headings, no error in the console, no request that fails), fit the page at both
widths (nothing wider than the page or than the text column; a table or the config.yaml block
wider than the text scrolls inside its own box, as the sweep's table of cells must on the
phone), load every image, and link only to pages that exist (the sweep's links to its cells'
reports).

The browser: Playwright for Python (PyPI ``playwright``, the test extra), its driver only,
driving Debian's ``/usr/bin/chromium``. Chosen over selenium + Debian's chromium-driver because
it is one package (its one dependency, greenlet, is already locked), it reports console
messages, page errors and failed requests as events, and it needs no second binary whose
version must match the browser's. Playwright's own browser download is never used (this
project's machines reach no download host): ``executable_path`` names Debian's build, and the
flags below keep Chromium from calling home (the closed network refuses those connections).
``scripts/setup.sh`` installs Debian's chromium where it is missing and it runs as root with
apt-get (CI does). Without a browser this test **fails in CI** (``CI=true``) and is skipped
elsewhere, with the command that installs one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from cllora.cli import main
from cllora.config import parse_overrides
from cllora.report.html import make_report
from tests.conftest import tiny_run_overrides

INSTALL = "sudo apt-get install chromium && pip install -e '.[test]'"
# Chromium's flags on a machine without a display or a network beyond the package registries
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
# a common laptop's page width, where nothing may scroll sideways; a phone's, where the wide
# tables do scroll, each inside its own box, and the page still does not
LAPTOP, PHONE = 1280, 360


def in_ci() -> bool:
    """Whether this runs in CI (``CI=true``), where a missing browser is a failure."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def find_chromium() -> str | None:
    """The browser: ``$CLLORA_CHROMIUM`` where set (None where that is no program), else
    Debian's Chromium, else a Chromium or Chrome on the PATH; None where there is none."""
    if named := os.environ.get("CLLORA_CHROMIUM"):
        return named if os.access(named, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next((path for name in names if (path := shutil.which(name))), None)


def _no_browser(why: str) -> None:
    message = f"{why}: the report's browser test needs it ({INSTALL})"
    if in_ci():
        pytest.fail(f"{message}; scripts/setup.sh installs chromium when run as root", False)
    pytest.skip(message)


def test_a_missing_browser_fails_in_ci_and_is_skipped_elsewhere(monkeypatch):
    monkeypatch.setenv("CLLORA_CHROMIUM", "/nonexistent/chromium")
    assert find_chromium() is None
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        _no_browser("no Chromium found")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        _no_browser("no Chromium found")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium, started once for the module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("Playwright for Python is not installed")
    executable = find_chromium()
    if executable is None:
        _no_browser("no Chromium found (/usr/bin/chromium, or $CLLORA_CHROMIUM)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """``root`` over HTTP on 127.0.0.1 (a free port), as the base URL, while the block runs."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # no line per request on stderr
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny run (two rounds, local models evaluated) and its report."""
    tmp = tmp_path_factory.mktemp("browser-run")
    one_step = {"train__local_steps": 1, "partition__max_test_per_client": 2}
    assert main(["run", *tiny_run_overrides(tmp, run_name="r", **one_step)]) == 0
    make_report(tmp / "r")
    return tmp / "r"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A tiny sweep (two learning rates, two clients, one round) and its report."""
    tmp = tmp_path_factory.mktemp("browser-sweep")
    spec = parse_overrides(tiny_run_overrides(tmp, fed__rounds=1, train__local_steps=1))
    spec["partition"].update(method="iid", num_clients=2)
    spec["sweep"] = {"name": "sw", "grid": {"train.lr": [0.001, 0.01]}}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(tmp / "sweep.yaml")]) == 0
    assert main(["report", str(tmp / "sw")]) == 0
    return tmp / "sw"


# Every rendered element that sticks out of the body's text column, or whose content does (a
# <pre>'s long line), unless it lies in a box that scrolls (a table's own box): what a
# scrolling box holds may be wider than the box.
_OVERFLOWING = """() => {
  const scrolls = el => getComputedStyle(el).overflowX !== 'visible';
  const body = document.body, cs = getComputedStyle(body), b = body.getBoundingClientRect();
  const left = b.left + parseFloat(cs.paddingLeft), right = b.right - parseFloat(cs.paddingRight);
  const out = [];
  const say = (el, what) => out.push(`<${el.tagName.toLowerCase()}> ${what}: ` +
                                     el.textContent.slice(0, 60));
  for (const el of body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;  // not rendered
    let box = el.parentElement;
    while (box !== body && !scrolls(box)) box = box.parentElement;
    if (box !== body) continue;
    if (r.left < left - 1 || r.right > right + 1)
      say(el, `${Math.round(r.left)}..${Math.round(r.right)} outside the text column ` +
              `${Math.round(left)}..${Math.round(right)}`);
    else if (!scrolls(el) && el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1)
      say(el, `content ${el.scrollWidth} px wide in ${el.clientWidth} px`);
  }
  return out;
}"""

_IMAGES = """() => Array.from(document.images, im =>
  ({src: im.src.slice(0, 80), complete: im.complete, width: im.naturalWidth}))"""


def open_report(browser: Any, url: str, width: int = LAPTOP) -> tuple[Any, list[str]]:
    """The page at ``url`` loaded in a window ``width`` px wide, its folded parts opened (a
    reader clicks config.yaml open); with every console error, page error and failed request
    (each as text) seen while it loaded."""
    page = browser.new_page(viewport={"width": width, "height": 800})
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status}: {r.url}"))
    response = page.goto(url, wait_until="load")
    assert response is not None and response.ok, url
    page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
    return page, problems


def check_page(browser: Any, url: str, title: str, width: int = LAPTOP) -> dict[str, Any]:
    """Every check of one report page at one width; returns its headings, its number of images,
    its links and, per table, whether it is wider than its box (then it scrolls in it)."""
    page, problems = open_report(browser, url, width)
    try:
        assert page.title() == title
        assert page.locator("h1").inner_text() == title
        headings = page.locator("h2").all_inner_texts()
        assert headings, "no section headings"
        page_width = page.evaluate("() => document.documentElement.scrollWidth")
        assert page_width <= page.evaluate("() => window.innerWidth"), f"{page_width} px wide"
        assert page.evaluate(_OVERFLOWING) == [], f"at {width} px"
        images = page.evaluate(_IMAGES)
        assert images and [i for i in images if not (i["complete"] and i["width"] > 0)] == []
        links = page.evaluate("() => Array.from(document.querySelectorAll('a[href]'), a => a.href)")
        for link in links:
            assert page.request.get(link).ok, f"broken link {link}"
        assert problems == []
        scrolls = page.evaluate(
            "() => Array.from(document.querySelectorAll('table'), t => "
            "getComputedStyle(t).overflowX === 'auto' && t.scrollWidth > t.clientWidth)"
        )
        return {"headings": headings, "images": len(images), "links": links, "scrolls": scrolls}
    finally:
        page.close()


def test_run_report_renders_fits_the_page_and_loads_its_images(browser, run_dir):
    with serve(run_dir) as base:
        seen = check_page(browser, f"{base}/report/report.html", "cllora run r")
        check_page(browser, f"{base}/report/report.html", "cllora run r", PHONE)
    assert {"Loss vs round", "Clients", "Configuration"} <= set(seen["headings"])
    assert seen["images"] == 3 and seen["links"] == []


def test_sweep_report_renders_fits_the_page_loads_its_images_and_links(browser, sweep_dir):
    with serve(sweep_dir) as base:
        seen = check_page(browser, f"{base}/report/report.html", "cllora sweep sw")
        for link in seen["links"]:  # the cells' own reports, beside the sweep's
            cell = link.split("/cells/")[1].split("/")[0]
            check_page(browser, link, f"cllora run {cell}")
        phone = check_page(browser, f"{base}/report/report.html", "cllora sweep sw", PHONE)
    assert {"Effects", "Levels by train.lr"} <= set(seen["headings"])
    assert seen["images"] == 4 and len(seen["links"]) == 2
    assert not any(seen["scrolls"]) and any(phone["scrolls"])  # the cells' table, on a phone
