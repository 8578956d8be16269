"""The page in a real browser: Debian's headless `chromium` driven by Selenium through `chromedriver`.

A server started on 127.0.0.1 serves a tiny trained disc model; the test drops a synthetic image on
the page, waits for the overlay, checks the mask the page shows against `Segmenter` on the same
image, moves the threshold and opacity sliders (no new request), downloads the mask, plays a
synthetic WebM with the overlay drawn live and runs the camera view on Chromium's fake camera (both
through the WebSocket), and saves screenshots as test artefacts in
$RESUNETPP_ARTIFACTS (default: build/test-artifacts). Skips, saying why, when the browser, its
driver or the Python packages are missing (`.ci/run` installs chromium and chromium-driver).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'resunetpp[serve]'")
pytest.importorskip("python_multipart", reason="the serve extra is not installed: pip install 'resunetpp[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'resunetpp[serve]'")
pytest.importorskip("websockets", reason="uvicorn's WebSocket support needs the websockets package")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium: pip install selenium")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from helpers.inference import disc_image, save_disc_checkpoint  # noqa: E402
from resunetpp import Segmenter  # noqa: E402
from resunetpp.serve import create_app  # noqa: E402

pytestmark = pytest.mark.slow  # Chromium

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("RESUNETPP_ARTIFACTS", ROOT / "build" / "test-artifacts"))
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver", "/usr/lib/chromium-browser/chromedriver")


def _find(names) -> str | None:
    for n in names:
        path = shutil.which(n) or (n if os.path.isfile(n) and os.access(n, os.X_OK) else None)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = save_disc_checkpoint(tmp_path_factory.mktemp("browser-ckpt"))
    seg = Segmenter(ckpt)
    app = create_app(seg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="auto"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 120  # deadlines here catch hangs; a loaded machine is slow, not broken
    while not srv.started:
        assert time.monotonic() < end and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", seg, app
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = _find([os.environ.get("RESUNETPP_CHROMIUM", ""), *BROWSERS])
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium chromium-driver, or set RESUNETPP_CHROMIUM)")
    driver_exe = _find([os.environ.get("RESUNETPP_CHROMEDRIVER", ""), "chromedriver", *DRIVERS])
    if driver_exe is None:
        pytest.skip("no chromedriver found (apt-get install chromium-driver, or set RESUNETPP_CHROMEDRIVER)")
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1280,1100",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_exe), options=opts)
    except Exception as e:
        pytest.skip(f"{exe} with {driver_exe} did not start: {type(e).__name__}: {str(e).splitlines()[0]}")
    driver.downloads = downloads
    yield driver
    driver.quit()


def _canvas(driver, selector: str) -> np.ndarray:
    url = driver.execute_script(f"return document.querySelector({selector!r}).toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def _wait(driver, script: str, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script("return " + script)
        if value:
            return value
        if time.monotonic() > end:
            logs = driver.get_log("browser")
            raise AssertionError(f"timed out waiting for {script}; browser log: {logs}")
        time.sleep(0.05)


def _check_shown_mask(shown: np.ndarray, prob: np.ndarray, threshold: float) -> None:
    """The page draws prob > threshold from a 16-bit copy of the map: only pixels within 1e-4 of the
    threshold may differ from Segmenter's own mask."""
    expected = prob > threshold
    differ = shown != expected
    assert expected.any() and (~expected).any()
    assert np.all(np.abs(prob[differ] - threshold) < 1e-4), f"{differ.sum()} pixels differ"


def _webm(path: Path) -> Path:
    """A 4 s VP8 video of a disc moving across a noisy background (synthetic)."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"VP80"), 10, (192, 144))
    if not writer.isOpened():
        pytest.skip("OpenCV cannot write a VP8 WebM video here")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:144, :192]
    for i in range(40):
        img = rng.normal(70, 12, (144, 192, 3))
        disc = (yy - 72) ** 2 + (xx - 40 - 3 * i) ** 2 <= 30 ** 2
        img[disc] = (200, 110, 90)
        writer.write(cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _save(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def test_page_drop_overlay_sliders_and_camera(server, browser):
    base, seg, app = server
    driver = browser
    image, _ = disc_image(np.random.default_rng(11), 288, 384)  # synthetic: never a dataset image
    png = io.BytesIO()
    Image.fromarray(image).save(png, "PNG")
    mask, prob = seg.segment(image)

    driver.get(base + "/")
    disclaimer = driver.find_element(By.ID, "disclaimer")
    assert disclaimer.is_displayed() and "not a medical device" in disclaimer.text.lower()
    _wait(driver, "window.resunetpp.model !== null")
    assert "resunetpp" in driver.find_element(By.ID, "model-line").text

    # drop the image on the drop zone, as a file dragged from the desktop
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "synthetic-disc.png", {type: "image/png"}));
        const zone = document.getElementById("drop");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    """, base64.b64encode(png.getvalue()).decode())
    _wait(driver, "window.resunetpp.results.length === 1 && window.resunetpp.pending === 0")
    assert driver.execute_script("return window.resunetpp.requests") == 1

    original = _canvas(driver, "canvas.orig")
    assert (original == image).all()  # the original, pixel for pixel
    overlay = _canvas(driver, "canvas.overlay")
    _check_shown_mask((overlay != original).any(axis=2), prob, seg.threshold)
    stats = driver.find_element(By.CSS_SELECTOR, ".card .stats").text
    assert f"{100 * mask.mean():.2f} %" in stats and "confidence" in stats
    _save(driver, "serve-page.png")

    # threshold slider: 20 steps of 0.01 up, redrawn in the page without a new request
    slider = driver.find_element(By.ID, "threshold")
    slider.click()
    slider.send_keys(Keys.HOME)
    slider.send_keys(Keys.ARROW_RIGHT * 70)
    assert driver.execute_script("return window.resunetpp.threshold") == pytest.approx(0.7)
    assert driver.find_element(By.ID, "threshold-value").text == "0.70"
    overlay_07 = _canvas(driver, "canvas.overlay")
    _check_shown_mask((overlay_07 != original).any(axis=2), prob, 0.7)
    assert (overlay_07 != original).any(axis=2).sum() < (overlay != original).any(axis=2).sum()
    assert driver.execute_script("return window.resunetpp.requests") == 1
    # opacity 0: the overlay is the original
    opacity = driver.find_element(By.ID, "opacity")
    opacity.click()
    opacity.send_keys(Keys.HOME)
    assert (_canvas(driver, "canvas.overlay") == original).all()
    opacity.send_keys(Keys.ARROW_RIGHT * 7)  # back to 0.35
    slider.send_keys(Keys.ARROW_LEFT * 20)  # back to 0.5

    # download the mask: a 0/255 PNG equal to the mask shown
    driver.find_element(By.CSS_SELECTOR, ".card .dl-mask").click()
    target = driver.downloads / "synthetic-disc_mask.png"
    end = time.monotonic() + 120
    while not target.is_file() and time.monotonic() < end:
        time.sleep(0.05)
    assert target.is_file(), f"no download in {list(driver.downloads.iterdir())}"
    _check_shown_mask(np.asarray(Image.open(target).convert("L")) > 127, prob, seg.threshold)

    # a video file: played with the overlay drawn live from the WebSocket's answers
    video = _webm(driver.downloads.parent / "discs.webm")
    driver.find_element(By.CSS_SELECTOR, "button[data-tab=video]").click()
    driver.execute_script("document.getElementById('video-file').hidden = false")
    driver.find_element(By.ID, "video-file").send_keys(str(video))
    _wait(driver, "window.resunetpp.live.video.frames >= 3")
    readout = driver.find_element(By.ID, "video-readout").text
    assert "frames/s" in readout and "latency" in readout
    frame = _canvas(driver, "#video-canvas")
    assert frame.shape[:2] == (144, 192) and (frame[:, :, 1] > frame[:, :, 0] + 40).any()  # green tint drawn
    driver.find_element(By.ID, "video-stop").click()

    # the camera view: Chromium's fake camera, frames through the WebSocket, a live readout
    driver.find_element(By.CSS_SELECTOR, "button[data-tab=camera]").click()
    driver.find_element(By.ID, "camera-start").click()
    _wait(driver, "window.resunetpp.live.camera.frames >= 5")
    readout = driver.find_element(By.ID, "camera-readout").text
    assert "frames/s" in readout and "latency" in readout and "dropped" in readout
    assert app.state.stats.frames_processed >= 5
    _save(driver, "serve-page-camera.png")
    driver.find_element(By.ID, "camera-stop").click()
    _wait(driver, "document.getElementById('camera-readout').textContent === 'camera off'")
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
    assert not severe, severe
