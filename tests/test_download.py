"""The flower photos' download (training/download.py, train.py --download), offline: a local archive
served over HTTP on 127.0.0.1 or read as a file. A wrong checksum, an archive that would write
outside its folder and a folder that is not ours all leave nothing behind."""
import hashlib
import http.server
import os
import tarfile
import threading

import pytest

import train
from helpers import COLORS, assert_clean_error, call, load, save_image, train_argv
from plumbing.options import UserError
from training import download


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    photos = root / "src" / "flower_photos"
    for k, name in enumerate(("daisy", "tulips")):
        for i in range(5):
            save_image(photos / name / f"{i:03d}.jpg", COLORS[k], seed=k * 100 + i)
    (photos / "LICENSE.txt").write_text("credits")
    tgz = root / "serve" / "flower_photos.tgz"
    tgz.parent.mkdir()
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(photos, arcname="flower_photos")
    return {"tgz": tgz, "sha256": hashlib.sha256(tgz.read_bytes()).hexdigest()}


@pytest.fixture
def server(archive):
    """http://127.0.0.1:<port>/flower_photos.tgz, served from a thread."""
    folder = str(archive["tgz"].parent)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/flower_photos.tgz"
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


@pytest.mark.quick
def test_download_flowers_over_http(archive, server, tmp_path):
    dest = tmp_path / "flower_data"
    photos = download.download_flowers(str(dest), url=server, sha256=archive["sha256"], log=lambda *a: None)
    assert photos == str(dest / "flower_photos")
    assert sorted(os.listdir(photos)) == ["LICENSE.txt", "daisy", "tulips"]
    assert len(os.listdir(os.path.join(photos, "daisy"))) == 5
    assert not [f for f in os.listdir(dest) if f.endswith(".part")]


@pytest.mark.quick
def test_download_with_wrong_sha256_leaves_nothing(archive, server, tmp_path):
    dest = tmp_path / "flower_data"
    with pytest.raises(UserError, match="SHA-256"):
        download.download_flowers(str(dest), url=server, sha256="0" * 64, log=lambda *a: None)
    assert os.listdir(dest) == []  # neither the archive nor a .part file


@pytest.mark.quick
def test_download_never_deletes_a_flower_photos_folder_it_did_not_make(tmp_path):
    dest = tmp_path / "flower_data"
    mine = dest / "flower_photos" / "my_notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    with pytest.raises(UserError, match="already exists: split it with"):
        download.download_flowers(str(dest), url=str(tmp_path / "never_read.tgz"), sha256=None, log=lambda *a: None)
    assert mine.read_text() == "keep me" and sorted(os.listdir(dest)) == ["flower_photos"]


@pytest.mark.quick
def test_an_archive_that_escapes_its_folder_is_one_line(tmp_path):
    evil = tmp_path / "flower_photos.tgz"
    payload = tmp_path / "payload.txt"
    payload.write_text("outside")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="flower_photos/../../escaped.txt")
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    code, _, err = call(train, ["--download", "--data-url", evil, "--data-sha256", sha,
                                *train_argv(tmp_path / "flower_data", tmp_path / "out")])
    assert_clean_error(code, err, "cannot extract", "not the flower photos archive")
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(os.listdir(tmp_path / "flower_data")) == ["flower_photos.tgz"]  # no half-extracted folder


def test_train_download_splits_and_trains(archive, tmp_path):
    data_dir = tmp_path / "flower_data"
    out = tmp_path / "out"
    argv = ["--download", "--data-url", archive["tgz"], "--data-sha256", archive["sha256"],
            *train_argv(data_dir, out, "--image-size", 32)]
    code, stdout, err = call(train, argv)
    assert code == 0, err
    for split, n in (("train", 4), ("val", 1)):
        for name in ("daisy", "tulips"):
            assert len(os.listdir(data_dir / split / name)) == n
    assert "8 train, 2 val images" in stdout
    assert load(out / "best.pth")["classes"] == ["daisy", "tulips"]
