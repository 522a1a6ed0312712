"""The flower photos' download: fetch flower_photos.tgz, check its SHA-256, extract it, split it 9:1.

    python train.py --download        # data_set/flower_data/{train,val}/<class>/

Offline, --data-url takes a local copy or a mirror (a file path, file:// or http:// URL).
"""
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zlib

from tqdm import tqdm

from plumbing.options import UserError
from training.data import split_dataset

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"


def download_and_split(root, url=FLOWERS_URL, sha256=FLOWERS_SHA256, log=print):
    """root/flower_photos/ from the archive, split 9:1 into root/train/ and root/val/ (seed 0)."""
    photos = download_flowers(root, url, sha256, log)
    split_dataset(photos, root, val_ratio=0.1, seed=0, log=log)  # refuses to replace a val/ it did not make


def download_flowers(dest_dir, url=FLOWERS_URL, sha256=FLOWERS_SHA256, log=print):
    """Fetch flower_photos.tgz (URL, file:// URL or local path), check its SHA-256, extract into dest_dir.

    Returns the path of the extracted flower_photos folder. Nothing it did not make is ever
    deleted: an existing dest_dir/flower_photos is refused, the archive is written to a temporary
    file and renamed once its checksum is right, and it is extracted into a temporary folder that
    is moved into place only when the whole archive came out.
    """
    archive = os.path.join(dest_dir, "flower_photos.tgz")
    extracted = os.path.join(dest_dir, "flower_photos")
    if os.path.exists(extracted):
        raise UserError(f"{extracted} already exists: split it with  python -m data_set.split_data --source "
                        f"{extracted} --dest {dest_dir}  or move it away to download the photos again")
    if os.path.exists(url):
        src, total = open(url, "rb"), os.path.getsize(url)
    else:
        try:
            src = urllib.request.urlopen(url, timeout=60)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot download {url} ({e}): check the network, or pass --data-url "
                            "with a mirror or a local copy of flower_photos.tgz") from e
        total = int(src.headers.get("Content-Length") or 0) or None
    try:
        os.makedirs(dest_dir, exist_ok=True)
        return _fetch_and_extract(src, total, url, sha256, dest_dir, archive, log)
    except OSError as e:
        raise UserError(f"cannot fetch and unpack the flower photos into {dest_dir} ({e.strerror or e}): check "
                        "the network and the free disk space (they need about 0.5 GB), or pass --data-path "
                        "with another folder") from e


def _fetch_and_extract(src, total, url, sha256, dest_dir, archive, log):
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".flower_photos.", suffix=".part")
    try:
        with src, os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                                    desc="download", file=sys.stderr) as bar:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if sha256 and digest.hexdigest() != sha256:
            raise UserError(f"{url} has SHA-256 {digest.hexdigest()}, expected {sha256}: "
                            "the download is damaged or not flower_photos.tgz; try again or use another --data-url")
        os.replace(tmp, archive)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    log(f"extracting {archive}")
    extracted = os.path.join(dest_dir, "flower_photos")
    staging = tempfile.mkdtemp(dir=dest_dir, prefix=".flower_photos.")
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, filter="data")  # refuses links and paths outside the folder
            else:  # a Python from before the 2023 tarfile update: the same refusal, by hand
                for member in tar.getmembers():
                    parts = member.name.replace("\\", "/").split("/")
                    if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                        raise UserError(f"{archive} holds an unsafe entry {member.name!r}: "
                                        "it is not the flower archive")
                tar.extractall(staging)
        if not os.path.isdir(os.path.join(staging, "flower_photos")):
            raise UserError(f"{archive} has no flower_photos folder: it is not the flower photos archive")
        os.rename(os.path.join(staging, "flower_photos"), extracted)
    except (tarfile.TarError, EOFError, zlib.error) as e:  # a damaged archive, or an entry that would escape
        raise UserError(f"cannot extract {archive} ({type(e).__name__}: {e}): it is damaged or not the flower "
                        "photos archive; delete it and download again, or pass another --data-url") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only what this function made
    return extracted
