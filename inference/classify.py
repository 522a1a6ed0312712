"""Classifying image files with a trained model, the same way for .pth weights (PyTorch) and .onnx
files (ONNX Runtime or OpenVINO, never importing torch): one preprocessing, one softmax with the
weights' temperature, one "not sure" score (the one the weights record: calibration.SCORES), one rule
for the class a photo is given (decided_class: "unknown" below the weights' "not sure" threshold)."""
import csv
import errno
import filecmp
import io
import itertools
import json
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from inference import calibration, images
from inference.calibration import UNKNOWN, Calibration
from plumbing.atomic import SaveError, atomic_write, atomic_write_text
from plumbing.options import UserError


@dataclass
class Classifier:
    """A trained model ready to classify: logits_of maps normalised float32 images N x 3 x H x W to
    logits N x classes (numpy both); for weights whose "not sure" score is the rotation score, its
    with_rotation(images) gives (logits, rotation agreement N) as well. torch_model is the PyTorch
    module of .pth weights (for Grad-CAM), None for a .onnx file. calibration: the weights'
    temperature, "not sure" score and threshold."""

    logits_of: Callable
    classes: list
    preprocessing: images.Preprocessing
    device_type: str = "cpu"
    torch_model: Optional[object] = None
    calibration: Calibration = Calibration()

    def probabilities(self, pixels, tta=False):
        """Calibrated class probabilities N x classes (softmax of the logits / the temperature) of
        uint8 N x H x W x 3 images, preprocessed already; with tta, of the mean logits of each image
        and its mirror."""
        logits, _ = self._outputs(images.normalize(pixels, self.preprocessing), tta, rotation=False)
        return calibration.softmax(logits, self.calibration.temperature)

    def assess(self, pixels, tta=False):
        """(the calibrated probabilities N x classes, the "not sure" scores N) of uint8 N x H x W x 3
        images, preprocessed already: what decided_class takes."""
        c = self.calibration
        logits, rotation = self._outputs(images.normalize(pixels, self.preprocessing), tta, c.needs_rotation)
        return (calibration.softmax(logits, c.temperature),
                calibration.sureness(c.score, logits, c.temperature, rotation))

    def _outputs(self, batch, tta, rotation):
        """(logits, rotation agreement or None) of a normalised batch; with tta, the means of the batch's
        and its mirror's."""
        def run(x):
            return self.logits_of.with_rotation(x) if rotation else (self.logits_of(x), None)

        logits, agreement = run(batch)
        if tta:
            mirrored, mirrored_agreement = run(np.ascontiguousarray(batch[..., ::-1]))
            logits = (logits + mirrored) / 2
            agreement = None if agreement is None else (agreement + mirrored_agreement) / 2
        return logits, agreement

    @property
    def min_confidence(self):
        return self.calibration.min_confidence


@dataclass(frozen=True)
class WeightsFormat:
    """A kind of weights file, and what opens it (a row of WEIGHTS_FORMATS)."""

    files: str  # what the file is and where it comes from
    opened_by: str  # what runs it
    torch: bool  # runs in PyTorch: the gradients Grad-CAM needs, --amp bf16/fp16; else never imports torch


# The weight formats and what opens each: the one place that tells them apart by a file's name. An INT8
# .onnx file opens as an fp32 one does: its graph holds the quantized operators, and the runtime runs them.
WEIGHTS_FORMATS = {
    ".pth": WeightsFormat("a checkpoint from train.py (best.pth, last.pth), or a plain state dict (any name but "
                          ".onnx; --class-indices names its classes)", "PyTorch: checkpoint.load_model",
                          torch=True),
    ".onnx": WeightsFormat("an ONNX file from export.py, fp32 or INT8 (--int8); its metadata holds the classes, "
                           "preprocessing and calibration", "ONNX Runtime or OpenVINO: runtimes.load_onnx",
                           torch=False),
}


def weights_format(weights):
    """The row of WEIGHTS_FORMATS a weights file is opened by."""
    return WEIGHTS_FORMATS[".onnx" if weights.lower().endswith(".onnx") else ".pth"]


def load_classifier(weights, class_indices="class_indices.json", device="auto", amp="auto", warn=print,
                    runtime="onnxruntime", loaded=None):
    """The Classifier of a weights file, opened as WEIGHTS_FORMATS says: a .pth checkpoint in PyTorch,
    a .onnx file in `runtime`. loaded: the checkpoint dict of a .pth file its caller has read already
    (it is read once)."""
    if weights_format(weights).torch:
        return _load_torch(weights, class_indices, device, amp, warn, loaded)
    return _load_onnx(weights, device, amp, runtime)


def _load_onnx(weights, device, amp, runtime):
    if not os.path.isfile(weights):
        raise UserError(f"weights file {weights} does not exist: export one with "
                              f"python export.py --output {weights}, or pass --weights with the right path")
    from inference.runtimes import load_onnx, recorded_calibration  # no torch on this path

    model, classes, preprocessing = load_onnx(weights, runtime=runtime, amp=amp, device=device)
    recorded = recorded_calibration(model, weights)
    if recorded.needs_rotation and not model.has_rotation:
        raise UserError(f"{weights} records the rotation score for \"not sure\" but has no rotation output: "
                              "export it again with export.py")
    return Classifier(model, classes, preprocessing, calibration=recorded)


def _load_torch(weights, class_indices, device, amp, warn, loaded):
    # torch only here: importing it takes seconds that a .onnx file never pays
    from inference import checkpoint as ckpt
    from plumbing import device as dev

    placement = dev.place(device, amp)
    if placement.warning:
        warn(placement.warning)
    if loaded is None:
        loaded = ckpt.load_checkpoint(weights)
    model, classes, preprocessing = ckpt.load_model(weights, class_indices, placement.device, loaded)
    recorded = calibration.of_checkpoint(loaded)
    if recorded.needs_rotation and model.rotation is None:
        raise UserError(f"{weights} records the rotation score for \"not sure\" but has no rotation head: "
                              "pass weights trained with --rotation-weight")
    return Classifier(TorchLogits(model, placement), classes, preprocessing, placement.device.type, model, recorded)


class TorchLogits:
    """A PyTorch model called like an ONNX Runtime session: numpy in, numpy logits out."""

    def __init__(self, model, placement):
        self.model, self.placement = model, placement

    def __call__(self, batch):
        return self._run(batch, rotation=False)[0]

    def with_rotation(self, batch):
        """(logits, the rotation head's agreement N: model.rotation_agreement)."""
        return self._run(batch, rotation=True)

    def _run(self, batch, rotation):
        import torch

        from plumbing import device as dev

        x = torch.from_numpy(batch).to(self.placement.device, memory_format=torch.channels_last)
        with torch.inference_mode(), dev.autocast(self.placement.device, self.placement.amp_dtype):
            logits = self.model(x).float().cpu().numpy()
            return logits, self.model.rotation_agreement(x).float().cpu().numpy() if rotation else None


def collect_images(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = images.find_image_files(path)
            if not found:
                raise UserError(f"folder {path} holds no images ({', '.join(images.IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"image {path} does not exist: check the path")
    return files


def prepare(path, preprocessing):
    """(uint8 crop x crop x 3, '') for a readable image, (None, its error) for any other file."""
    try:
        return images.resize_and_crop(images.load_image(path), preprocessing), ""
    except Exception as e:  # reported per file after the run, never silently replaced
        return None, f"{type(e).__name__}: {e}"


def predict(classifier, files, batch_size=32, workers=1, tta=False, sureness=False):
    """(probabilities N x classes, errors) with errors[i] = '' for every readable file; unreadable
    files get a row of zeros. workers threads decode the next two batches while the model runs
    (Pillow decodes without the GIL); 0 decodes in this thread. sureness: (probabilities, errors,
    the "not sure" scores N) instead."""
    batches = list(score_batches(classifier, files, batch_size, workers, tta))
    probabilities = np.concatenate([b.probabilities for b in batches])
    errors = [e for b in batches for e in b.errors]
    if sureness:
        return probabilities, errors, np.concatenate([b.sureness for b in batches])
    return probabilities, errors


@dataclass
class ScoredBatch:
    """A batch of photos as score_batches gives it (errors[i] '' for a readable photo; an unreadable
    one has a row of zero probabilities) and decide completes it (answers)."""

    files: list
    probabilities: np.ndarray  # calibrated, N x classes
    sureness: np.ndarray  # the "not sure" score of each photo (the weights' own: calibration.SCORES)
    errors: list
    answers: Optional[list] = None  # decide: the class each photo is given, or "unknown"


def score_batches(classifier, files, batch_size=32, workers=1, tta=False):
    """The photos scored a batch at a time, in order: each read and preprocessed (prepare, in worker
    threads), run and calibrated (Classifier.assess); a ScoredBatch each, so that a caller can write
    each batch before the next one is classified."""
    crop = classifier.preprocessing.crop
    for batch, prepared in _prepared_batches(files, classifier.preprocessing, batch_size, workers):
        pixels = np.stack([p if p is not None else np.zeros((crop, crop, 3), np.uint8) for p, _ in prepared])
        yield ScoredBatch(batch, *classifier.assess(pixels, tta), [e for _, e in prepared])


def decide(batch, classifier):
    """The batch's readable photos with their answers (decided_class at the weights' threshold, or
    --min-confidence's); the unreadable ones are left out (their errors stay in batch.errors)."""
    good = [i for i, e in enumerate(batch.errors) if not e]
    probabilities, sureness = batch.probabilities[good], batch.sureness[good]
    answers = [decided_class(classifier.classes, p, classifier.min_confidence, s)
               for p, s in zip(probabilities, sureness, strict=True)]
    return ScoredBatch([batch.files[i] for i in good], probabilities, sureness, [""] * len(good), answers)


def _prepared_batches(files, preprocessing, batch_size, workers):
    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    if workers == 0:
        for batch in batches:
            yield batch, [prepare(f, preprocessing) for f in batch]
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            ahead = deque()
            for batch in batches:
                ahead.append((batch, [pool.submit(prepare, f, preprocessing) for f in batch]))
                if len(ahead) > 2:
                    batch, futures = ahead.popleft()
                    yield batch, [f.result() for f in futures]
            while ahead:
                batch, futures = ahead.popleft()
                yield batch, [f.result() for f in futures]
        finally:  # a caller that stops early (Ctrl-C) does not wait for two more batches to be decoded
            pool.shutdown(wait=False, cancel_futures=True)


def decided_class(classes, probabilities, min_confidence=0.0, sureness=None):
    """The class predict.py and the page give a photo: in the table, the CSV and JSON rows and the
    folder that --sort-into puts it in. The most likely class, or "unknown" when its "not sure" score
    (sureness; None: its top probability) is below min_confidence (the weights' threshold, or
    --min-confidence): the model is not sure."""
    best = int(np.argmax(probabilities))
    score = float(probabilities[best]) if sureness is None else float(sureness)
    return UNKNOWN if score < min_confidence else classes[best]


def csv_header(classes):
    return ["file", "class", "probability"] + list(classes)


def csv_rows(files, answers, probabilities):
    """A predictions table's rows: file, the class it was given (decide), its top probability, then
    one probability per class."""
    for f, answer, p in zip(files, answers, np.asarray(probabilities).tolist(), strict=True):
        yield [f, answer, f"{max(p):.6f}"] + [f"{v:.6f}" for v in p]


def _csv_text(rows):
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def write_output(path, classes, batch):
    """A decided batch's whole table at once, as .json or .csv (CsvOutput writes a .csv a batch at a time)."""
    if path.lower().endswith(".json"):
        text = json.dumps([{"file": f, "class": answer, "probability": max(p),
                            "probabilities": dict(zip(classes, p, strict=True))}
                           for f, answer, p in zip(batch.files, batch.answers, batch.probabilities.tolist(),
                                                   strict=True)], indent=2) + "\n"
    elif path.lower().endswith(".csv"):
        text = _csv_text([csv_header(classes), *csv_rows(batch.files, batch.answers, batch.probabilities)])
    else:
        raise UserError(f"--output {path}: the file name must end in .csv or .json")
    atomic_write_text(path, text)


class CsvOutput:
    """A predictions .csv that grows a batch at a time, each batch written whole or not at all: a run
    stopped at any moment leaves every row written before, and a run with the same file skips the
    photos it already holds.

    done: {photo: class} of the rows already in the file when it was opened, each photo by its
    resolved path (photos/a.jpg, ./photos/a.jpg and its absolute path are one photo: classes_of
    looks files up that way); torn: whether its last row had been cut short (a kill mid-write) and
    was cut off, so that its photo is classified again. photos: the run's photos, which the message
    of a failed write counts ("7 of 24 photos are in it"); without them it counts the file's rows."""

    def __init__(self, path, classes, photos=None):
        self.path, self.header, self.photos = path, csv_header(classes), photos
        self.done, self.torn, self.written = {}, False, 0
        self._real_folders = {}  # resolving each row's folder once: a big table has many rows per folder
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            self._read_existing()
        else:  # the header appears whole or not at all: a full disk leaves no file behind
            atomic_write_text(path, _csv_text([self.header]))
        try:  # unbuffered: a failed write leaves nothing behind to be written (and fail again) on close
            self.file = open(path, "ab", buffering=0)
            self.end = os.fstat(self.file.fileno()).st_size
        except OSError as e:
            raise SaveError(path, e, "pass another --output") from e

    def classes_of(self, files):
        """{file: class} of the files whose photo has a row in the file already, however it was typed."""
        return {f: self.done[key] for f in files if (key := self._photo(f)) in self.done}

    def _photo(self, path):
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in self._real_folders:
            self._real_folders[folder] = os.path.realpath(folder)
        return os.path.join(self._real_folders[folder], name)

    def _read_existing(self):
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                rows = _rows_with_ends(f)
                header, end_of_rows, whole = next(rows)
                if header != self.header:
                    raise UserError(f"--output {self.path} holds {_describe(header, self.header)}, so this "
                                          f"run cannot continue it: pass another --output, or delete {self.path} "
                                          "to start again")
                if not whole:
                    end_of_rows = None  # a header alone, without its newline: the first row would join it
                for line, (row, end, whole) in enumerate(rows, start=2):
                    if not whole:
                        self.torn = True
                        break
                    if row and len(row) != len(self.header):
                        raise UserError(f"line {line} of --output {self.path} is not a row of predictions "
                                              f"({len(row)} columns, not {len(self.header)}): pass another "
                                              f"--output, or delete {self.path} to start again")
                    if row:
                        self.done[self._photo(row[0])] = row[1]
                    end_of_rows = end
        except (UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"--output {self.path} is not a predictions table ({e}): pass another "
                                  f"--output, or delete {self.path} to start again") from e
        except OSError as e:
            raise UserError(f"cannot read --output {self.path} ({e.strerror}): pass another --output") from e
        if end_of_rows is None:
            atomic_write_text(self.path, _csv_text([self.header]))
        elif end_of_rows < size:
            try:
                os.truncate(self.path, end_of_rows)
            except OSError as e:
                raise SaveError(self.path, e, "pass another --output") from e

    def append(self, files, answers, probabilities):
        """Write the rows of one decided batch to the file, straight through to it. Where a write fails
        (a full disk), the file is cut back to the rows before the batch and SaveError raised."""
        data = memoryview(_csv_text(csv_rows(files, answers, probabilities)).encode("utf-8"))
        size = len(data)
        try:
            while data:
                data = data[self.file.write(data):]
        except OSError as e:
            try:
                os.ftruncate(self.file.fileno(), self.end)
            except OSError:
                pass  # the next run drops a row cut short
            raise SaveError(self.path, e, self.continue_hint()) from e
        self.end += size
        self.written += len(files)

    def continue_hint(self):
        """What a failed write leaves in the file, and how to go on: the one message of that failure."""
        if self.photos is None:
            held = f"{len(self.done) + self.written:,} photos"
        else:
            held = f"{len(self.classes_of(self.photos)) + self.written:,} of {len(self.photos):,} photos"
        return f"{held} are in it; free some disk space and run the same command again to continue"

    def close(self):
        try:
            os.fsync(self.file.fileno())
        except OSError:
            pass  # every row is in the file already; this only hurries them to the disk
        finally:
            self.file.close()


def _rows_with_ends(f):
    """(row, byte offset after it, whether it is whole) of a binary CSV file, rows that span lines
    (a quoted newline) whole. A last row without its newline, cut short by a kill mid-write wherever
    its bytes end (inside a character, inside a quoted name), comes last and not whole."""
    end, ended, exhausted = 0, True, False

    def lines():
        nonlocal end, ended, exhausted
        for raw in f:
            end += len(raw)
            ended = raw.endswith(b"\n")  # only the file's last line can lack it
            yield raw.decode("utf-8", errors="strict" if ended else "replace")
        exhausted = True

    rows = csv.reader(lines(), strict=True)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error:
            if ended and not exhausted:
                raise  # a broken line before the last: not a table this program wrote
            yield [], end, False  # the last row, cut inside a quoted field
            return
        yield row, end, ended


def _describe(header, expected):
    def short(names):
        return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    if header[:3] == expected[:3]:
        return f"the classes {short(header[3:])}, not this model's {short(expected[3:])}"
    return f"the columns {short(header)}, not {short(expected[:3])} and one per class"


class PhotoSorter:
    """--sort-into: each photo goes into root/<class>/ as a hard link where the file system allows it,
    else as a copy; the photos themselves are never moved or changed. A name taken by another photo
    gets a suffix (a_2.jpg); a photo already there (the same file, or the same bytes) is not added
    again, so a second run over the same photos adds only the new ones."""

    def __init__(self, root):
        self.root = root
        self.linked = self.copied = self.already = 0

    def place(self, photo, class_name):
        """Sort one photo; '' when it is in its class folder, else why not (the photo could not be read)."""
        folder = os.path.join(self.root, _folder_name(class_name))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise SaveError(folder, e, "pass another --sort-into") from e
        stem, extension = os.path.splitext(os.path.basename(photo))
        for n in itertools.count(1):
            target = os.path.join(folder, f"{stem}{extension}" if n == 1 else f"{stem}_{n}{extension}")
            if os.path.lexists(target):
                if _same_photo(photo, target):
                    self.already += 1
                    return ""
                continue
            try:
                os.link(photo, target)
            except FileExistsError:
                continue
            except OSError as e:  # another file system (EXDEV), or one without hard links: a copy instead
                if e.errno == errno.ENOENT and not os.path.exists(photo):
                    return f"it is gone ({e.strerror})"
                return self._copy(photo, target)
            self.linked += 1
            return ""

    def _copy(self, photo, target):
        try:
            source = open(photo, "rb")
        except OSError as e:
            return f"cannot read it to copy it ({e.strerror})"
        with source:  # whole or not at all: a copy cut short by a stop never looks like a sorted photo
            atomic_write(target, lambda out: shutil.copyfileobj(source, out), "free some disk space, or pass "
                         "another --sort-into (on the photos' own file system, hard links take no space)")
        shutil.copystat(photo, target)
        self.copied += 1
        return ""


def _folder_name(class_name):
    name = class_name.replace(os.sep, "_")
    if os.altsep:
        name = name.replace(os.altsep, "_")
    return name if name.strip(".") else f"_{name}"


def _same_photo(photo, target):
    try:
        return os.path.samefile(photo, target) or (os.path.isfile(target) and filecmp.cmp(photo, target, shallow=False))
    except OSError:
        return False
