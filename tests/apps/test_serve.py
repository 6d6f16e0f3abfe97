"""`vip2clip serve`: the HTTP API in-process, then the real page in headless Chromium (Selenium)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vip2clip
from vip2clip.apps.serve import UploadError, decode_upload, is_loopback, make_server, synthetic_examples
from vip2clip.cli import main
from vip2clip.data.index import DatasetIndex
from vip2clip.inference.predictor import Predictor, Thresholds

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve-screenshot.png"
LIMIT = 200_000


def _png(array: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def _from_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


@pytest.fixture(scope="module")
def predictor(tiny_model) -> Predictor:
    return Predictor(tiny_model, Thresholds(0.5, 0.5, "test"))


@pytest.fixture(scope="module")
def server_url(predictor: Predictor) -> Iterator[str]:
    server = make_server(predictor, "127.0.0.1", 0, LIMIT, synthetic_examples(size=64))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


def _request(url: str, data: bytes | None = None) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, body, kind = response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        status, body, kind = error.code, error.read(), error.headers["Content-Type"]
    return status, json.loads(body) if kind == "application/json" else body.decode()


def test_page_and_examples(server_url: str) -> None:
    status, page = _request(server_url + "/")
    assert status == 200 and "vip2clip" in page and f"const MAX_BYTES = {LIMIT};" in page
    status, examples = _request(server_url + "/api/examples")
    assert status == 200 and [e["label"].split()[0] for e in examples] == ["normal", "defect", "defect"]
    assert _from_data_url(examples[0]["thumbnail"]).shape == (64, 64, 3)
    status, result = _request(server_url + f"/api/example?name={examples[1]['name']}", b"")
    assert status == 200 and (result["width"], result["height"]) == (64, 64)
    assert _request(server_url + "/api/example?name=nope", b"")[0] == 404
    assert _request(server_url + "/missing")[0] == 404


def test_predict_upload_matches_predictor(server_url: str, predictor: Predictor) -> None:
    grey = np.random.default_rng(0).integers(0, 256, (50, 70), dtype=np.uint8)
    status, result = _request(server_url + "/api/predict", _png(grey))
    assert status == 200
    reference = predictor.predict(grey)[0]
    assert (result["width"], result["height"]) == (70, 50)
    assert result["pred_score"] == pytest.approx(reference.pred_score, abs=1e-6)
    assert result["pred_label"] == reference.pred_label
    assert result["defect_area"] == pytest.approx(reference.defect_area)
    assert (result["image_threshold"], result["pixel_threshold"]) == (0.5, 0.5)
    encoded = _from_data_url(result["map"]).astype(int)
    decoded = (encoded[..., 0] * 256 + encoded[..., 1]) / 65535
    np.testing.assert_allclose(decoded, reference.anomaly_map, atol=1e-5)
    np.testing.assert_array_equal(_from_data_url(result["mask"]) > 0, reference.pred_mask)
    assert _from_data_url(result["overlay"]).shape == (50, 70, 3)


def test_bad_uploads_get_messages(server_url: str) -> None:
    status, answer = _request(server_url + "/api/predict", b"just some text, certainly not a picture")
    assert status == 400 and "not an image" in answer["error"]
    status, answer = _request(server_url + "/api/predict", b"")
    assert status == 400 and "empty" in answer["error"]
    noise = _png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    status, answer = _request(server_url + "/api/predict", noise[: len(noise) // 2])
    assert status == 400 and "damaged" in answer["error"]
    status, answer = _request(server_url + "/api/predict", os.urandom(LIMIT + 1))
    assert status == 413 and "limit is 0.2 MB" in answer["error"]


def test_decode_upload_limits() -> None:
    data = _png(np.zeros((20, 30, 3), np.uint8), "BMP")
    assert decode_upload(data).size == (30, 20)
    with pytest.raises(UploadError, match="image is 30x20 pixels"):
        decode_upload(data, max_pixels=100)
    rgba = decode_upload(_png(np.zeros((5, 6, 4), np.uint8)))
    assert rgba.mode == "RGB"


def test_loopback_detection_and_cli_errors(capsys: pytest.CaptureFixture) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    assert main(["serve", "--backbone", "tiny", "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb must be > 0" in capsys.readouterr().err


def _chrome_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def served(trained_tiny_checkpoint) -> Iterator[str]:
    """`python -m vip2clip serve` with the trained tiny model, a real process on a free loopback port; its URL."""
    checkpoint = trained_tiny_checkpoint.checkpoint
    command = [sys.executable, "-m", "vip2clip", "serve", "--checkpoint", str(checkpoint), "--backbone", "tiny"]
    process = subprocess.Popen([*command, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        url, seen, deadline = None, [], time.monotonic() + 180
        while url is None:
            assert process.poll() is None and time.monotonic() < deadline, "server did not start:\n" + "".join(seen)
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
                if "serving the vip2clip demo on " in seen[-1]:
                    url = seen[-1].split(" on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:"), seen
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def best_found_defect(predictor: Predictor, index: DatasetIndex) -> tuple[Path, float]:
    """The defective test image whose mask (at the predictor's pixel threshold) best overlaps the ground truth,
    and that overlap (intersection over union), after checking that its score beats every normal image's."""
    samples = index.samples("test")
    results = predictor.predict([index.resolve(s.img_path) for s in samples])
    normal_scores = [r.pred_score for r, s in zip(results, samples, strict=True) if not s.anomaly]
    overlaps = {}
    for result, sample in zip(results, samples, strict=True):
        if sample.anomaly and result.pred_score > max(normal_scores):
            truth = np.asarray(Image.open(index.resolve(sample.mask_path))) > 0
            overlaps[index.resolve(sample.img_path)] = (result.pred_mask & truth).sum() / (
                result.pred_mask | truth
            ).sum()
    assert overlaps, "the trained model ranks no defective image above all normal ones"
    return max(overlaps.items(), key=lambda item: item[1])


@pytest.mark.slow
def test_browser_upload_shows_score_overlay_and_errors(served: str, trained_tiny_checkpoint, tmp_path: Path) -> None:
    paths = _chrome_paths()
    if paths is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,760"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=paths[1]), options=options)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(served)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "button.example")) == 3)
        # The screenshot should show what a trained model does: upload an unseen defect it finds.
        model = vip2clip.create_model(checkpoint=trained_tiny_checkpoint.checkpoint)
        reference_predictor = Predictor(model, Thresholds(0.5, 0.5, "test"))
        found, overlap = best_found_defect(reference_predictor, trained_tiny_checkpoint.unseen)
        assert overlap > 0.4, f"the trained model's mask hardly overlaps the defect of {found} (IoU {overlap:.2f})"
        image = tmp_path / "part.png"
        shutil.copy(found, image)
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "score").text != "")
        score = float(driver.find_element(By.ID, "score").text)
        assert 0.0 <= score <= 1.0
        assert driver.find_element(By.ID, "overlay").get_attribute("src").startswith("data:image/png;base64,")
        reference = reference_predictor.predict(image)[0]
        assert score == pytest.approx(reference.pred_score, abs=1e-4)
        assert driver.find_element(By.ID, "decision").text == reference.pred_label
        area = driver.find_element(By.ID, "area").text
        assert float(area.rstrip(" %")) == pytest.approx(100 * reference.defect_area, abs=2.0)

        def slide(slider: str, value: float) -> None:
            script = "const s = document.getElementById(arguments[0]); s.value = arguments[1];"
            driver.execute_script(script + "s.dispatchEvent(new Event('input'));", slider, value)

        slide("image-threshold", 0.0)
        assert driver.find_element(By.ID, "decision").text == "anomalous"
        slide("image-threshold", 1.0)
        assert driver.find_element(By.ID, "decision").text == "normal"
        slide("pixel-threshold", 0.0)
        assert driver.find_element(By.ID, "area").text == "100.00 %"
        slide("pixel-threshold", 1.0)
        assert driver.find_element(By.ID, "area").text == "0.00 %"
        slide("image-threshold", 0.5)
        slide("pixel-threshold", 0.5)
        assert driver.find_element(By.ID, "area").text == area
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        temporary = SCREENSHOT.with_name(".serve-screenshot.png.tmp")
        temporary.write_bytes(driver.get_screenshot_as_png())
        os.replace(temporary, SCREENSHOT)

        text = tmp_path / "notes.txt"
        text.write_text("this is not an image")
        driver.find_element(By.ID, "file").send_keys(str(text))
        wait.until(lambda d: "not an image" in d.find_element(By.ID, "error").text)
        assert not driver.find_element(By.ID, "result").is_displayed()
    finally:
        driver.quit()
