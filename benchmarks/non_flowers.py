"""The far unknowns of docs/trust.md: pictures that are not flowers, gathered again from the Debian and
PyPI packages that ship them, each checked against the sha256 in benchmarks/non_flowers.csv.

    python benchmarks/non_flowers.py --out runs/non_flowers
    python benchmarks/non_flowers.py --out runs/non_flowers --split tune
    python benchmarks/non_flowers.py --out DIR --from-folder PACKAGES   # .deb and .whl files already here: no network

The manifest (--manifest, default benchmarks/non_flowers.csv) has a row per picture: its name in
OUT, its source (deb:PACKAGE, a Debian package; pypi:PACKAGE==VERSION, a wheel), its path inside the
package (PATH.rcc:MEMBER for a file inside one of the package's Qt resource bundles, where GCompris
keeps its photos), its sha256 and its split: tune for choosing settings (a third: the pictures whose
sha256 begins with 8 hex digits that make a multiple of 3), test for the table. Every picture was
looked at: photos and photo-like pictures only, no blossom, no icon, no text, no near-copy.

Each package is fetched once into --cache (apt-get download PACKAGE; pip download --no-deps
--only-binary :all: PACKAGE==VERSION), or taken from --from-folder, which then is the only place
looked in. A .deb is unpacked with dpkg-deb -x into a temporary folder; a wheel is read as the zip
file it is. The pictures are copied unchanged into OUT/tune/ and OUT/test/ (--split picks one);
train.py --unknowns OUT/test scores them.
"""
import argparse
import csv
import fnmatch
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from inference.images import IMAGE_EXTENSIONS  # noqa: E402
from plumbing.options import UserError, run_command  # noqa: E402

MANIFEST = os.path.join(HERE, "non_flowers.csv")
COLUMNS = ["name", "source", "path", "sha256", "split"]
SPLITS = ("tune", "test")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where the pictures go: OUT/tune/ and OUT/test/")
    p.add_argument("--cache", default="/tmp/googlenet-non-flowers",
                   help="where the downloaded .deb and .whl files are kept, each fetched once")
    p.add_argument("--from-folder", default=None, metavar="FOLDER",
                   help="a folder of the .deb and .whl files, downloaded before: used instead of downloading")
    p.add_argument("--split", choices=("all", *SPLITS), default="all",
                   help="tune: for choosing settings; test: for the table; all: both")
    p.add_argument("--manifest", default=MANIFEST, help="the CSV of the pictures (name,source,path,sha256,split)")
    return p


def read_manifest(path):
    """The manifest's rows, each a dict of COLUMNS, checked: a row that cannot be right is an error."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except OSError as e:
        raise UserError(f"cannot read the manifest {path}: {e.strerror}") from e
    if reader.fieldnames != COLUMNS:
        raise UserError(f"manifest {path}: its columns are {reader.fieldnames}, not {COLUMNS}")
    names = set()
    for line, row in enumerate(rows, start=2):
        where = f"manifest {path} line {line}"
        if not re.fullmatch(r"deb:[a-z0-9][a-z0-9.+-]+|pypi:[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", row["source"]):
            raise UserError(f"{where}: source {row['source']!r} is neither deb:PACKAGE nor pypi:PACKAGE==VERSION")
        if row["split"] not in SPLITS:
            raise UserError(f"{where}: split {row['split']!r} is neither tune nor test")
        if not re.fullmatch(r"[0-9a-f]{64}", row["sha256"]):
            raise UserError(f"{where}: {row['sha256']!r} is not a sha256 (64 hex digits)")
        file = row["path"].split(":")[0]
        if os.path.isabs(file) or ".." in file.split("/") or not row["path"]:
            raise UserError(f"{where}: path {row['path']!r} is not a path inside the package")
        if (os.path.basename(row["name"]) != row["name"] or not row["name"].lower().endswith(IMAGE_EXTENSIONS)
                or row["name"] in names):
            raise UserError(f"{where}: name {row['name']!r} is not a new file name ending in an image "
                                  f"extension ({', '.join(IMAGE_EXTENSIONS)})")
        names.add(row["name"])
    return rows


def package_file(source, cache, from_folder):
    """The .deb or .whl of source: found in from_folder (never downloaded then), else in cache, else
    downloaded into cache."""
    kind, spec = source.split(":", 1)
    if kind == "deb":
        pattern = f"{spec}_*.deb"
    else:
        name, version = spec.split("==")
        pattern = f"{re.sub(r'[-_.]+', '_', name)}-{version}-*.whl"
    folder = from_folder or cache
    names = os.listdir(folder) if os.path.isdir(folder) else []
    found = sorted(os.path.join(folder, n) for n in names if fnmatch.fnmatch(n.lower(), pattern.lower()))
    if len(found) > 1:
        raise UserError(f"{source}: {len(found)} files in {folder} ({', '.join(map(os.path.basename, found))}); "
                              f"keep one")
    if found:
        return found[0]
    if from_folder:
        raise UserError(f"{source}: no {pattern} in --from-folder {from_folder}")
    os.makedirs(cache, exist_ok=True)
    if kind == "deb":
        tool, command = "apt-get download", ["apt-get", "download", spec]
    else:
        tool = "pip download"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", ".", spec]
    print(f"{source}: $ {' '.join(command)}  (in {cache})", flush=True)
    try:
        proc = subprocess.run(command, cwd=cache, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as e:
        raise UserError(f"{source}: {command[0]} is not installed here; download the package elsewhere and "
                              f"pass its folder as --from-folder") from e
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("E:", "ERROR:"))]
    if proc.returncode != 0:
        raise UserError(f"{source}: {tool} failed ({proc.returncode}): "
                              f"{(errors or proc.stderr.strip().splitlines() or ['no message'])[-1]}")
    return package_file(source, cache, cache)


def rcc_members(blob, where):
    """{path: bytes} of a Qt resource bundle (rcc's binary format, versions 1-3; entries stored or
    zlib-compressed, as rcc writes them by default)."""
    if blob[:4] != b"qres":
        raise UserError(f"{where} is not a Qt resource bundle")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    node_size = 14 if version == 1 else 22

    def name(node):
        offset = names + struct.unpack_from(">I", blob, tree + node * node_size)[0]
        length = struct.unpack_from(">H", blob, offset)[0]
        return blob[offset + 6:offset + 6 + 2 * length].decode("utf-16-be")

    members, stack = {}, [(0, "")]
    while stack:
        node, path = stack.pop()
        flags = struct.unpack_from(">H", blob, tree + node * node_size + 4)[0]
        if flags & 2:  # a folder: its children are count nodes from first
            count, first = struct.unpack_from(">II", blob, tree + node * node_size + 6)
            stack.extend((child, f"{path}{name(child)}/") for child in range(first, first + count))
            continue
        offset = data + struct.unpack_from(">I", blob, tree + node * node_size + 10)[0]
        size = struct.unpack_from(">I", blob, offset)[0]
        content = blob[offset + 4:offset + 4 + size]
        if flags & 4:
            raise UserError(f"{where}: {path[:-1]} is zstd-compressed, which this script does not read")
        members[path[:-1]] = zlib.decompress(content[4:]) if flags & 1 else content
    return members


def read_member(root, path, where, bundles):
    """The bytes of path (PATH or PATH.rcc:MEMBER) under the unpacked package root; bundles keeps
    each resource bundle's members once read."""
    file, _, member = path.partition(":")
    full = os.path.realpath(os.path.join(root, file))
    if not full.startswith(os.path.realpath(root) + os.sep) or not os.path.isfile(full):
        raise UserError(f"{where} has no file {file}")
    if not member:
        with open(full, "rb") as f:
            return f.read()
    if full not in bundles:
        with open(full, "rb") as f:
            bundles[full] = rcc_members(f.read(), f"{where}: {file}")
    if member not in bundles[full]:
        raise UserError(f"{where}: {file} holds no {member}")
    return bundles[full][member]


def copy_pictures(source, rows, package, out):
    """Unpack package, check each row's sha256 and copy its picture to out/<split>/<name>."""
    where = f"{source} ({os.path.basename(package)})"
    with tempfile.TemporaryDirectory(prefix="non-flowers-") as root:
        if source.startswith("deb:"):
            try:
                proc = subprocess.run(["dpkg-deb", "-x", package, root], stderr=subprocess.PIPE, text=True)
            except FileNotFoundError as e:
                raise UserError("dpkg-deb is not installed here (Debian's dpkg package): it unpacks the "
                                      ".deb files") from e
            if proc.returncode != 0:
                raise UserError(f"{where}: dpkg-deb -x failed: {proc.stderr.strip().splitlines()[-1:]}")
        else:
            try:
                with zipfile.ZipFile(package) as wheel:
                    wanted = {row["path"].split(":")[0] for row in rows} & set(wheel.namelist())
                    wheel.extractall(root, members=sorted(wanted))
            except zipfile.BadZipFile as e:
                raise UserError(f"{where} is not a wheel (zip file): {e}") from e
        bundles = {}
        for row in rows:
            content = read_member(root, row["path"], where, bundles)
            digest = hashlib.sha256(content).hexdigest()
            if digest != row["sha256"]:
                raise UserError(f"{where}: {row['path']} has sha256 {digest}, the manifest {row['sha256']}: "
                                      f"not the picture that was looked at (another version of the package?)")
            with open(os.path.join(out, row["split"], row["name"]), "wb") as f:
                f.write(content)


def main(argv=None):
    opts = get_args_parser().parse_args(argv)
    rows = [row for row in read_manifest(opts.manifest) if opts.split in ("all", row["split"])]
    if opts.from_folder and not os.path.isdir(opts.from_folder):
        raise UserError(f"--from-folder {opts.from_folder} is not a folder")
    by_source = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    packages = {source: package_file(source, opts.cache, opts.from_folder) for source in by_source}
    splits = SPLITS if opts.split == "all" else (opts.split,)
    for split in splits:
        shutil.rmtree(os.path.join(opts.out, split), ignore_errors=True)  # no picture of an older manifest stays
        os.makedirs(os.path.join(opts.out, split))
    for source, picked in by_source.items():
        copy_pictures(source, picked, packages[source], opts.out)
        print(f"{source}: {len(picked)} pictures", flush=True)
    counts = ", ".join(f"{sum(row['split'] == s for row in rows)} in {os.path.join(opts.out, s)}" for s in splits)
    print(f"{len(rows)} pictures from {len(by_source)} packages: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, None))
