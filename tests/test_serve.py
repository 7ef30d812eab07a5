"""`imgfeat serve` in a real browser (Debian's headless Chromium, driven by Selenium through
Debian's chromedriver) over the search corpus: thumbnails, neighbours, search by a dropped
image, the planted duplicate groups and the broken file; and requests that try to leave the
store."""

import io
import json
import os
import time

import pytest
from PIL import Image
from search_corpus import make_search_corpus, thumbnail_model
from serving import form, request, serving

import imgfeat
from imgfeat.cli import main

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from imgfeat.serve.app import create_app

    root = tmp_path_factory.mktemp("serve")
    groups = make_search_corpus(root / "corpus")
    out = root / "out"
    assert main(["extract", str(root / "corpus"), "-o", str(out), "--model",
                 str(thumbnail_model(root / "thumb.pt")), "--image-size", "64",
                 "--devices", "cpu:1", "--quiet"]) == 0
    store = imgfeat.open_store(out)
    with serving(create_app(store)) as port:
        yield root, port, groups, store
    store.close()


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromedriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_window_size(1400, 1000)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 30):
    """The value of `script` once it is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := driver.execute_script(script):
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}")


def keys_in(driver, selector: str) -> list[str]:
    return driver.execute_script(
        f"return [...document.querySelectorAll('{selector} figure')].map(f => f.dataset.key)")


def test_grid_shows_thumbnails_and_a_click_shows_neighbours(served, browser):
    root, port, groups, store = served
    browser.get(f"http://127.0.0.1:{port}/")
    loaded = wait_for(browser, "const imgs = [...document.querySelectorAll('#items img')];"
                      "return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0)"
                      " && imgs.length")
    assert loaded == min(60, len(store))
    original, planted = next(iter(groups.items()))
    browser.execute_script(
        f"document.querySelector('#items figure[data-key=\"{original}\"]').click()")
    wait_for(browser, "return document.querySelectorAll('#neighbours figure').length > 3")
    shown = keys_in(browser, "#neighbours")
    assert shown[0] == original and sorted(shown[1:4]) == sorted(planted)
    scores = browser.execute_script(
        "return [...document.querySelectorAll('#neighbours .score')].map(s => s.textContent)")
    assert all(float(s) >= 0.95 for s in scores[:3])


def test_an_image_dropped_into_search_returns_results(served, browser):
    root, port, groups, _ = served
    original, planted = next(iter(groups.items()))
    browser.get(f"http://127.0.0.1:{port}/")
    browser.execute_script("document.querySelector('button[data-view=search]').click()")
    # A real drop event carrying the image as a File, as a user's drag from the desktop.
    data = list((root / "corpus" / planted[0]).read_bytes())
    browser.execute_script("""
        const file = new File([new Uint8Array(arguments[0])], arguments[1],
                              {type: 'image/jpeg'});
        const transfer = new DataTransfer();
        transfer.items.add(file);
        document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    """, data, planted[0])
    wait_for(browser, "return document.querySelectorAll('#results figure').length >= 4")
    shown = keys_in(browser, "#results")
    assert set(shown[:4]) == {original, *planted}
    # The file input takes the same path.
    browser.find_element("id", "file").send_keys(str(root / "corpus" / original))
    wait_for(browser, "return document.getElementById('search-status').textContent"
                      f".includes('nearest to {original}')")
    assert keys_in(browser, "#results")[0] == original


def test_duplicates_and_errors_views_show_the_planted_cases(served, browser):
    root, port, groups, _ = served
    browser.get(f"http://127.0.0.1:{port}/")
    browser.execute_script("document.querySelector('button[data-view=duplicates]').click()")
    wait_for(browser, "return document.querySelectorAll('#groups .group').length")
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#groups .group')].map("
        "g => [...g.querySelectorAll('figure')].map(f => f.dataset.key).sort())")
    assert sorted(shown) == sorted(sorted([o, *p]) for o, p in groups.items())
    browser.execute_script("document.querySelector('button[data-view=errors]').click()")
    text = wait_for(browser, "return document.querySelector('#error-list li')?.textContent")
    assert text.startswith("broken.jpg: ") and "unreadable image header" in text


@pytest.mark.parametrize("path", [
    "/api/thumb/../../../../etc/passwd", "/api/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/api/thumb/-1", "/api/thumb/999999", "/api/thumb?path=/etc/passwd", "/etc/passwd",
    "/../../etc/passwd", "/api/neighbours/..%2F..%2Fetc%2Fpasswd",
])
def test_a_path_outside_the_store_is_refused(served, path):
    _, port, _, _ = served
    status, body = request(port, path)
    assert status in (400, 404, 405, 422) and b"root:" not in body


def test_uploads_past_the_limits_are_refused(served, monkeypatch):
    from imgfeat.serve import uploads

    _, port, _, _ = served
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 1000)
    monkeypatch.setattr(uploads.read_limited, "__defaults__", (1000,))
    status, body = request(port, "/api/search", "POST", *form(file=("big.jpg", b"x" * 5000)))
    assert status == 413 and b"over" in body
    monkeypatch.undo()
    bomb = io.BytesIO()
    Image.new("1", (10000, 10000)).save(bomb, "PNG")  # 100 MP in a few kB
    status, body = request(port, "/api/search", "POST",
                           *form(file=("bomb.png", bomb.getvalue())))
    assert status == 400 and "too large" in json.loads(body)["detail"]


def test_serve_warns_when_bound_beyond_this_machine(monkeypatch, capsys, served):
    from imgfeat.serve import app

    root, *_ = served
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert main(["serve", str(root / "out"), "--host", "0.0.0.0", "--port", "1"]) == 0
    assert "warning: serving on 0.0.0.0" in capsys.readouterr().err
    assert app.LOCAL_HOSTS >= {"127.0.0.1"}
