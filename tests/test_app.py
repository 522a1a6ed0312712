"""app.py: the demo page, served on a free local port by a real process and called the way people
call it: through gradio_client (the probabilities equal predict.py's; what is not a photo gets a
message and the next good request still works; many requests leave the memory flat) and through a
real headless Chromium driven by Playwright (upload three photos, see the class). What the page
stores (uploads, over the limit or not) does not outlive the answer or the page; what a request
names in place of an upload (a file on the server, a link, a data: URL over the limit) is refused in
one line of the log, as any HTTP client can send it. Offline."""
import base64
import json
import os
import re
import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, PageServer, assert_clean_error, needs, run_script, save_image, write_truncated_jpeg
from inference import classify

# the page runs in its own process: this one needs gradio installed, not imported (seconds of collecting)
pytestmark = needs("gradio", "gradio_client", "httpx", why="the demo page's: requirements-dev.txt")
try:
    import gradio_client
except ImportError:  # every test here is skipped then
    gradio_client = None
CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and os.path.exists(p)), None)


class Server(PageServer):
    """python app.py ... in its own process, with a gradio_client of it, until stop()."""

    def __init__(self, *args):
        super().__init__(*args)
        self.client = gradio_client.Client(self.url, verbose=False,
                                           download_files=os.path.join(tempfile.gettempdir(), "downloads"))

    def classify(self, path):
        return self.client.predict(gradio_client.handle_file(str(path)), api_name="/classify")

    @property
    def folder(self):
        """The page's own temporary folder, which its first line names."""
        found = re.search(r"kept in (\S+) until answered", "".join(self.output))
        assert found, "".join(self.output)
        return Path(found.group(1))

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module", autouse=True)
def temp_folder(tmp_path_factory):
    """The module's own temp folder, for this process and the servers: gradio writes uploads under
    it and gradio_client leaves an empty folder there per download (250 in /tmp a run, before)."""
    folder = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(folder))
        patch.setenv("TMPDIR", str(folder))  # the servers' processes get it through script_env
        patch.setenv("GRADIO_TEMP_DIR", str(folder / "gradio"))
        yield folder


@pytest.fixture(scope="module")
def trained(small_run):
    return small_run


@pytest.fixture(scope="module")
def page(trained):
    server = Server("--weights", trained["best"], "--examples", trained["data"] / "val", "--device", "cpu",
                    "--amp", "off")
    yield server
    server.stop()


def confidences(label):
    return {c["label"]: c["confidence"] for c in label["confidences"]}


def test_the_page_gives_predict_pys_probabilities_and_a_heat_map(page, trained):
    photo = trained["data"] / "val" / "tulips" / "tulips_01.jpg"
    label, heat, note = page.classify(photo)
    classifier = classify.load_classifier(str(trained["best"]), device="cpu", amp="off")
    expected, _ = classify.predict(classifier, [str(photo)], 1, 0)
    expected_confidences = dict(zip(classifier.classes, expected[0].tolist(), strict=True))
    assert confidences(label) == pytest.approx(expected_confidences, abs=1e-6)
    assert label["label"] == classifier.classes[int(expected[0].argmax())]
    with Image.open(heat) as picture:
        assert picture.width > 2 * classifier.preprocessing.crop  # the photo and its overlay, side by side
    assert note.startswith(f"Grad-CAM of {label['label']}")


def bomb_png(path, side=20000):
    """A PNG whose header claims side x side pixels (400 megapixels) in a few bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_what_is_not_a_photo_gets_a_message_and_the_page_goes_on(page, trained, tmp_path):
    good = trained["data"] / "val" / "daisy" / "daisy_00.jpg"
    (tmp_path / "notes.jpg").write_text("a shopping list, not a photo")
    whole = good.read_bytes()
    (tmp_path / "half.jpg").write_bytes(whole[: len(whole) // 2])
    refused = {tmp_path / "notes.jpg": "cannot be read as an image",
               tmp_path / "half.jpg": "cannot be read as an image",
               bomb_png(tmp_path / "bomb.png"): "too large to be a photo"}
    for path, words in refused.items():
        with pytest.raises(gradio_client.exceptions.AppError, match=words):
            page.classify(path)
        assert page.classify(good)[0]["label"]  # the next good request is answered

    rng = np.random.default_rng(0)
    answered = {"one_pixel.png": Image.new("RGB", (1, 1), (200, 30, 30)),
                "sixteen_bit.png": Image.fromarray(rng.integers(0, 65535, (40, 60), dtype=np.uint16)),
                "cmyk.jpg": Image.new("CMYK", (64, 48), (0, 200, 200, 0)),
                "fifty_megapixels.jpg": Image.new("RGB", (8660, 5774), (30, 160, 40))}
    for name, image in answered.items():
        image.save(tmp_path / name)
        label, _, _ = page.classify(tmp_path / name)
        assert sum(confidences(label).values()) == pytest.approx(1.0, abs=1e-4), name


def test_many_requests_leave_the_memory_flat(page, trained):
    photos = sorted((trained["data"] / "val").rglob("*.jpg"))
    for photo in photos * 4:  # warm up: every code path and cache has run
        page.classify(photo)
    before = page.rss_mib()
    for i in range(200):
        page.classify(photos[i % len(photos)])
    jobs = [page.client.submit(gradio_client.handle_file(str(photos[i % len(photos)])), api_name="/classify")
            for i in range(20)]
    assert all(job.result(timeout=300)[0]["label"] for job in jobs)
    growth = page.rss_mib() - before
    assert growth < 50, f"the server grew by {growth:.0f} MiB over 220 requests"


def test_an_onnx_page_says_the_heat_map_needs_the_pth(trained, small_onnx):
    server = Server("--weights", small_onnx)
    try:
        label, heat, note = server.classify(trained["data"] / "val" / "roses" / "roses_00.jpg")
        assert heat is None and "needs PyTorch weights" in note and label["label"]
    finally:
        server.stop()


def files_in(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def call_raw(server, payload):
    """One request to /classify as any HTTP client can send it (no gradio_client, no upload first):
    (the stream's last event, its data)."""
    import httpx

    event = httpx.post(server.url + "gradio_api/call/classify", json={"data": [payload]}, timeout=120)
    assert event.status_code == 200, event.text
    stream = httpx.get(server.url + f"gradio_api/call/classify/{event.json()['event_id']}", timeout=120).text
    kind, data = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, re.MULTILINE)[-1]
    return kind, json.loads(data)


def data_url(path):
    """A photo as a data: URL, the form a pasted image may take instead of an upload."""
    return {"url": "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode(),
            "meta": {"_type": "gradio.FileData"}}


def log_after(server, since, lines):
    """The server's log after its first since lines, once it holds lines more (a thread reads it)."""
    deadline = time.monotonic() + 60
    while len(server.output) < since + lines and time.monotonic() < deadline:
        time.sleep(0.05)
    return [line.rstrip("\n") for line in server.output[since:]]


def noise_png(path, megabytes):
    """A real photo-like PNG of about this many MB (noise does not compress)."""
    side = int((megabytes * 2 ** 20 / 3) ** 0.5)
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def test_bad_uploads_are_one_log_line_and_answered_uploads_are_deleted(page, trained, tmp_path):
    folder = page.folder
    kept = set(files_in(folder))  # the examples, and heat maps sent to earlier tests
    (tmp_path / "notes.jpg").write_text("a shopping list, not a photo")
    write_truncated_jpeg(tmp_path / "half.jpg")
    logged = len(page.output)
    for name in ("notes.jpg", "half.jpg"):
        with pytest.raises(gradio_client.exceptions.AppError) as refused:
            page.classify(tmp_path / name)
        message = str(refused.value)
        assert "cannot be read as an image" in message
        assert "/" not in message and str(folder) not in message, message  # no server path: the upload's name
    assert page.classify(save_image(tmp_path / "garden.jpg", (40, 200, 60), seed=99))[0]["label"]
    assert page.classify(trained["data"] / "val" / "daisy" / "daisy_01.jpg")[0]["label"]  # an example's bytes
    assert "Traceback" not in "".join(page.output)
    lines = page.output[logged:]
    assert [line.split(":")[0] for line in lines] == ["refused notes.jpg", "refused half.jpg"], lines
    assert kept <= set(files_in(folder))  # the examples stay for the next visitor
    left = [path for path in files_in(folder) if path not in kept]
    assert {path.name for path in left} <= {"where-it-looked.webp"}, left  # the garden's heat map, sent


def test_an_answered_upload_is_answered_again_once_its_file_is_gone(page, trained):
    import httpx

    photo = trained["data"] / "train" / "roses" / "roses_03.jpg"
    with open(photo, "rb") as f:
        stored = httpx.post(page.url + "gradio_api/upload", files={"files": ("rose.jpg", f)}).json()[0]
    payload = {"data": [{"path": stored, "meta": {"_type": "gradio.FileData"}}]}  # what the browser sends
    answers = []
    for _ in range(2):  # the automatic answer on upload, then the button
        event = httpx.post(page.url + "gradio_api/call/classify", json=payload)
        stream = httpx.get(page.url + f"gradio_api/call/classify/{event.json()['event_id']}", timeout=120).text
        assert "event: complete" in stream, stream
        answers.append(stream.split("data:", 1)[1].split('"path"')[0])
        assert not os.path.exists(stored)
    assert answers[0] == answers[1] and '"label"' in answers[0]


@pytest.mark.quick
def test_a_data_url_is_held_to_the_limit_by_its_length_before_it_is_decoded():
    import app

    for size in (1026, 1027, 1028):  # base64 with no padding, "==" and "="
        photo = bytes(range(256)) * 4 + bytes(size - 1024)
        url = "data:image/png;base64," + base64.b64encode(photo).decode()
        assert app.pasted_image(url, limit=size).read() == photo  # the limit itself is taken
        with pytest.raises(app.Upload, match="over the page's limit"):
            app.pasted_image(url, limit=size - 1)
    with pytest.raises(app.Upload, match="not base64 data"):
        app.pasted_image("data:image/png;base64,not*base64", limit=100)
    with pytest.raises(app.Upload, match=r"cannot be read as an image \(cannot identify image file the pasted"):
        app.read_upload(app.pasted_image("data:text/plain;base64,bm90ZXM=", limit=100), "the pasted image")


def test_a_request_naming_a_server_file_or_a_link_is_refused_in_one_line(page, trained):
    photo = trained["data"] / "val" / "tulips" / "tulips_00.jpg"  # a photo on the server, never uploaded
    meta = {"_type": "gradio.FileData"}
    requests = {
        # what the browser sends, naming another file: Gradio refuses it before the handler runs
        "gradio's check": {"path": str(photo), "meta": meta},
        # without Gradio's meta its check is skipped (preprocess=False): the page's own must hold
        "the page's check": {"path": str(photo)},
        "a missing file": {"path": str(photo.parent / "nothing-here.jpg")},  # the same answer: no oracle
        "a link": {"path": "https://example.invalid/rose.jpg", "meta": meta},  # Gradio would fetch it, unbounded
        "not a file at all": str(photo),
    }
    logged = len(page.output)
    messages = {}
    for what, payload in requests.items():
        kind, data = call_raw(page, payload)
        assert kind == "error" and data["error"], (what, data)
        messages[what] = data["error"]
    assert "not among the page's uploads" in messages["gradio's check"]
    assert messages["the page's check"] == messages["a missing file"].replace("nothing-here", "tulips_00")
    assert "does not fetch links" in messages["a link"]
    assert "not an upload" in messages["not a file at all"]
    assert photo.exists()  # never the handler's to delete
    lines = log_after(page, logged, len(requests))  # one line each, no framework traceback
    assert len(lines) == len(requests), lines
    assert all(line.startswith("refused ") and line.endswith(f": {message}")
               for line, message in zip(lines, messages.values())), lines
    assert "Traceback" not in "".join(page.output)
    assert page.classify(photo)[0]["label"]  # the same photo, uploaded, is answered


def test_the_upload_limit_is_the_servers_and_a_terminated_page_leaves_nothing(trained, tmp_path):
    import httpx

    server = Server("--weights", trained["best"], "--max-upload-mb", 1, "--device", "cpu", "--amp", "off")
    try:
        folder = server.folder
        big = tmp_path / "big.jpg"
        big.write_bytes(np.random.default_rng(0).integers(0, 256, 2 * 2 ** 20, dtype=np.uint8).tobytes())
        with open(big, "rb") as f:  # what a client that ignores the page's limit sends
            refused = httpx.post(server.url + "gradio_api/upload", files={"files": ("big.jpg", f)})
        assert refused.status_code == 413 and "maximum allowed size of 1048576 bytes" in refused.text, refused.text
        assert files_in(folder) == []  # refused while it arrived: nothing stored
        # the same photo as a data: URL in one JSON request, as an attacker sends it: held to the same
        # limit before it is decoded, so nothing is decoded or written
        photo = noise_png(tmp_path / "pasted.png", 2)
        logged = len(server.output)
        kind, data = call_raw(server, data_url(photo))
        assert kind == "error" and "over the page's limit of 1 MB" in data["error"], data
        assert files_in(folder) == []
        assert log_after(server, logged, 1) == [f"refused the pasted image: {data['error']}"]
        kind, data = call_raw(server, data_url(save_image(tmp_path / "small.png", (200, 40, 40), seed=5)))
        assert kind == "complete" and data[0]["label"], data  # a data: URL within the limit is answered
        with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):
            server.classify(big)  # the page tells its clients the limit (the browser says "1.0 MB")
        assert server.classify(trained["data"] / "val" / "roses" / "roses_00.jpg")[0]["label"]
        assert folder.is_dir()
    finally:
        server.stop()
    assert server.proc.returncode == 0 and not folder.exists(), "".join(server.output)
    assert "Traceback" not in "".join(server.output)


def test_app_mistakes_are_one_line(tmp_path):
    proc = run_script(REPO / "app.py", ["--weights", tmp_path / "none.pth"], timeout=120)
    assert_clean_error(proc.returncode, proc.stderr, "does not exist")
    proc = run_script(REPO / "app.py", ["--examples", tmp_path / "nowhere"], timeout=120)
    assert_clean_error(proc.returncode, proc.stderr, "--examples", "not a folder")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_a_real_browser_sees_the_class_and_its_uploads_do_not_outlive_the_page(trained, tmp_path, temp_folder):
    """Three photos uploaded in a browser, as a person would: each is gone once its answer is shown,
    the button answers again, and when the page stops (the browser still open) none is left."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (requirements-dev.txt)")
    photos = [save_image(tmp_path / f"photo_{i}.jpg", (60 + 60 * i, 160, 40), seed=40 + i) for i in range(3)]
    classifier = classify.load_classifier(str(trained["best"]), device="cpu", amp="off")
    expected = classifier.classes[int(classify.predict(classifier, [str(photos[-1])], 1, 0)[0][0].argmax())]
    server = Server("--weights", trained["best"], "--examples", trained["data"] / "val", "--device", "cpu",
                    "--amp", "off")
    folder = server.folder
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
            try:
                tab = browser.new_page(viewport={"width": 1100, "height": 760})
                tab.goto(server.url)
                for photo in photos:
                    shown = [img.get_attribute("src") for img in tab.locator("img[src*=where-it-looked]").all()]
                    tab.locator("input[type=file]").first.set_input_files(str(photo))
                    tab.wait_for_function("shown => [...document.querySelectorAll('img[src*=where-it-looked]')]"
                                          ".some(img => !shown.includes(img.src))", arg=shown, timeout=120_000)
                    # answered: the upload is gone (at most the one in flight is on disk)
                    assert [p for p in files_in(folder) if p.name.startswith("photo_")] == [], files_in(folder)
                tab.get_by_role("button", name="Classify").click()  # the last photo again, its file gone
                answer = tab.locator("#classes").get_by_text(expected, exact=True).first
                answer.wait_for(timeout=120_000)
                assert answer.is_visible()
                tab.screenshot(path=str(tmp_path / "page.png"))
                server.stop()  # with the browser still open
            finally:
                browser.close()
    finally:
        server.stop()
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert server.proc.returncode == 0 and not folder.exists(), "".join(server.output)
    assert [p for p in temp_folder.rglob("*") if p.name.startswith("photo_")] == []  # nor anywhere else
    assert "Traceback" not in "".join(server.output)
