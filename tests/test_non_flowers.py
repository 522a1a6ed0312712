"""benchmarks/non_flowers.py gathers the non-flower pictures from packages already in a folder (no
network here): a tiny .deb built with dpkg-deb, holding a Qt resource bundle as GCompris' does, and a
tiny wheel; and the real manifest is the set docs/trust.md describes."""
import csv
import hashlib
import io
import shutil
import struct
import subprocess
import zipfile
import zlib

import pytest
from PIL import Image

from helpers import REPO, assert_clean_error, run_script

SCRIPT = REPO / "benchmarks" / "non_flowers.py"
pytestmark = pytest.mark.quick


def png(color, size=(100, 100)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def rcc_bundle(folder, files):
    """A Qt resource bundle (rcc format 3) of folder/NAME for each (NAME, bytes, zlib?) in files."""
    names = b""

    def name_offset(name):
        nonlocal names
        offset, encoded = len(names), name.encode("utf-16-be")
        names += struct.pack(">HI", len(name), 0) + encoded
        return offset

    data, leaves = b"", []
    for name, content, compress in files:
        stored = struct.pack(">I", len(content)) + zlib.compress(content) if compress else content
        leaves.append(struct.pack(">IHHHI", name_offset(name), 1 if compress else 0, 0, 0, len(data)) + bytes(8))
        data += struct.pack(">I", len(stored)) + stored
    tree = (struct.pack(">IHII", 0, 2, 1, 1) + bytes(8)  # the root: one child, node 1
            + struct.pack(">IHII", name_offset(folder), 2, len(files), 2) + bytes(8) + b"".join(leaves))
    header = 24
    return (b"qres" + struct.pack(">IIIII", 3, header, header + len(tree), header + len(tree) + len(data), 0)
            + tree + data + names)


PICTURES = {"a": png("red"), "b": png("blue"), "x": png("green"), "y": png("yellow", (120, 97)), "c": png("gray")}


@pytest.fixture
def packages(tmp_path):
    """tmp_path/packages/ with fakepics_1.0_all.deb and fakewheel-1.0-py3-none-any.whl, and the manifest
    rows (name, source, path, sha256, split) of their pictures."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (Debian's dpkg package)")
    root = tmp_path / "fakepics"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: fakepics\nVersion: 1.0\nArchitecture: all\n"
                                              "Maintainer: Test <test@example.org>\nDescription: test pictures\n")
    (root / "usr/share/pics/sub").mkdir(parents=True)
    (root / "usr/share/pics/a.png").write_bytes(PICTURES["a"])
    (root / "usr/share/pics/sub/b.png").write_bytes(PICTURES["b"])
    (root / "usr/share/pics/bundle.rcc").write_bytes(
        rcc_bundle("photos", [("x.png", PICTURES["x"], False), ("y.png", PICTURES["y"], True)]))
    folder = tmp_path / "packages"
    folder.mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", str(root),
                    str(folder / "fakepics_1.0_all.deb")], check=True, capture_output=True)
    with zipfile.ZipFile(folder / "fakewheel-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fakewheel/data/c.png", PICTURES["c"])
        wheel.writestr("fakewheel-1.0.dist-info/METADATA", "Name: fakewheel\nVersion: 1.0\n")
    rows = [("fakepics__a.png", "deb:fakepics", "usr/share/pics/a.png", "a", "test"),
            ("fakepics__b.png", "deb:fakepics", "usr/share/pics/sub/b.png", "b", "tune"),
            ("fakepics__x.png", "deb:fakepics", "usr/share/pics/bundle.rcc:photos/x.png", "x", "test"),
            ("fakepics__y.png", "deb:fakepics", "usr/share/pics/bundle.rcc:photos/y.png", "y", "tune"),
            ("fakewheel__c.png", "pypi:fakewheel==1.0", "fakewheel/data/c.png", "c", "test")]
    return folder, [(n, s, p, hashlib.sha256(PICTURES[k]).hexdigest(), split) for n, s, p, k, split in rows]


def write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "source", "path", "sha256", "split"])
        writer.writerows(rows)
    return path


def gather(tmp_path, folder, rows, *args):
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    return run_script(SCRIPT, ["--out", tmp_path / "out", "--from-folder", folder, "--manifest", manifest, *args])


def test_pictures_land_in_their_split_folders_under_their_names(tmp_path, packages):
    folder, rows = packages
    proc = gather(tmp_path, folder, rows)
    assert proc.returncode == 0, proc.stderr
    for split in ("test", "tune"):
        expected = {name: PICTURES[name.split("__")[1][0]] for name, _, _, _, s in rows if s == split}
        found = {p.name: p.read_bytes() for p in (tmp_path / "out" / split).iterdir()}
        assert found == expected, split
    assert "5 pictures from 2 packages: 2 in" in proc.stdout

    proc = gather(tmp_path, folder, rows, "--split", "tune", "--out", tmp_path / "tune-only")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (tmp_path / "tune-only").iterdir()] == ["tune"]
    assert sorted(p.name for p in (tmp_path / "tune-only" / "tune").iterdir()) == ["fakepics__b.png",
                                                                                 "fakepics__y.png"]


def test_a_wrong_sha256_is_one_line_naming_the_package_and_the_file(tmp_path, packages):
    folder, rows = packages
    name, source, path, sha, split = rows[3]
    rows[3] = (name, source, path, "0" * 64, split)
    proc = gather(tmp_path, folder, rows)
    line = assert_clean_error(proc.returncode, proc.stderr, "deb:fakepics", "usr/share/pics/bundle.rcc:photos/y.png",
                              sha)
    assert proc.stderr.count("error:") == 1 and len(line) < 400


def test_a_package_missing_from_the_folder_is_named(tmp_path, packages):
    folder, rows = packages
    (folder / "fakewheel-1.0-py3-none-any.whl").unlink()
    proc = gather(tmp_path, folder, rows)
    assert_clean_error(proc.returncode, proc.stderr, "pypi:fakewheel==1.0", "--from-folder", str(folder))


def test_a_path_the_package_lacks_is_named(tmp_path, packages):
    folder, rows = packages
    rows[2] = (rows[2][0], rows[2][1], "usr/share/pics/bundle.rcc:photos/z.png", *rows[2][3:])
    proc = gather(tmp_path, folder, rows)
    assert_clean_error(proc.returncode, proc.stderr, "deb:fakepics", "holds no photos/z.png")


def test_the_real_manifest_is_a_set_of_distinct_pictures_from_several_packages():
    with open(REPO / "benchmarks" / "non_flowers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 250
    assert len({row["source"] for row in rows}) >= 4
    assert len({row["sha256"] for row in rows}) == len(rows)
    assert len({row["name"] for row in rows}) == len(rows)
    # the split is the sha256's: a third of the pictures (those whose first 8 hex digits are a multiple of 3) tune
    assert all(row["split"] == ("tune" if int(row["sha256"][:8], 16) % 3 == 0 else "test") for row in rows)
    assert 0.25 < sum(row["split"] == "tune" for row in rows) / len(rows) < 0.42
    for row in rows:
        package = row["source"].split(":", 1)[1].split("==")[0]
        assert row["name"].startswith(f"{package}__"), row
