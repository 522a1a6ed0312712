"""The data review page: what is wrong with a data folder, one photo at a time, decided with a key
press into DIR/review.csv (data_set/review.py), which training then applies.

    python app.py --review --data-path DIR --weights RUN/best.pth # copies, leakage, unreadable files, and
                                                                  # the model's view: suspect labels,
                                                                  # "not sure", confidently wrong
    python app.py --review --data-path DIR                        # the same with weights/best.pth, app.py's
                                                                  # default; without that file, the first three

Its lists: the suspect labels (RUN/suspect_labels.csv's order when it is about DIR, else every
training photo ranked by 1 - p(given class) under the weights, as training ranks them), the
training photos the model is not sure about (the weights' own "not sure" score below their
threshold, as predict.py decides; the top probability with --min-confidence) or
gets wrong with a probability of at least CONFIDENT, the exact and near copies that stay in one
part and those that cross train/val (leakage), as data_set.check groups them, and the unreadable
files. An item is one photo, shown with the rest of its group: its path relative to DIR, its
size, its class, the model's top classes and the decision recorded for it. Keep, relabel to a
class or exclude it with a button or a key (1-9 and 0: the classes in order; x, k; the arrows move);
each decision is appended to DIR/review.csv at once, the page moves to the next item, and the
last decision for a photo is the one that counts.

What the browser sends is a list's name and a position in it, never a path: the server shows and
decides only the photos it listed. Photos are sent downscaled, inline in the page; Gradio's
temporary folder is the page's own and goes when it stops. What the page computed is kept for the
next start, each file's entry valid while its size and modification time are the same, so that a
second start on the 2,939 flower photos decodes nothing: with weights, each file's hashes and class
probabilities in RUN/review_cache.json; without, its hashes in the user's cache folder
(~/.cache/googlenet-review/, or $XDG_CACHE_HOME's), one file per data folder, named after a hash of
its absolute path (the data folder itself gets nothing but review.csv).

A folder where review.csv cannot be written (read-only, full, review.csv a broken link) is refused
at start; a decision that fails to be written later is a message on the page and one line in the
log, and the page goes on.
"""
import base64
import csv
import functools
import hashlib
import html
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data_set import check, review
from inference import checkpoint as ckpt
from inference import classify, images
from inference.calibration import SCORE_NAMES
from plumbing import serving
from plumbing.atomic import atomic_write_text
from plumbing.options import UserError
from plumbing.run_lock import probe_writable
from training import labels

CACHE = "review_cache.json"
CACHE_VERSION = 2  # 2: each photo's "not sure" score beside its probabilities
USER_CACHE = "googlenet-review"  # the folder, in the user's cache folder, of the caches of pages without weights
CONFIDENT = 0.9  # "confidently wrong": the model's class for a training photo is another, with at least this
PHOTO_SIDE = 640  # the longer side in px of a photo sent alone
GROUP_SIDE = 320  # ... and of each photo of a group, side by side
RECENT = 12  # the decisions listed under the item
FIX = "fix or delete that line (the page only ever appends to the file)"
KINDS = {  # the lists, in the order the page offers them
    "suspects": "suspect labels",
    "not sure": "not sure",
    "confidently wrong": "confidently wrong",
    "duplicates": "copies",
    "leakage": "train/val leakage",
    "unreadable": "unreadable",
}
# Keys: 1-9 and 0 relabel to the classes in order, x excludes, k keeps, the arrows move; each
# clicks the button it stands for, so a key does exactly what the button does. Keys typed into a
# text field are left alone.
KEYS = """() => {
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (target && target.closest && target.closest("textarea, [contenteditable=true], "
        + "input:not([type=radio]):not([type=checkbox]):not([type=button])")) return;
    let id = null;
    if (/^[0-9]$/.test(event.key)) id = "review-class-" + ((Number(event.key) + 9) % 10);
    else if (event.key === "x" || event.key === "X") id = "review-exclude";
    else if (event.key === "k" || event.key === "K") id = "review-keep";
    else if (event.key === "ArrowRight") id = "review-next";
    else if (event.key === "ArrowLeft") id = "review-previous";
    const button = id && document.getElementById(id);
    if (button) {
      event.preventDefault();
      button.click();
    }
  });
}"""
CSS = """
#review-item figure { display: inline-block; vertical-align: top; margin: 4px; padding: 6px;
                      border: 3px solid transparent; }
#review-item figure.current { border-color: var(--color-accent); }
#review-item figcaption { font-size: 0.85em; max-width: 340px; overflow-wrap: anywhere; }
"""


@dataclass(frozen=True)
class Item:
    """One entry of a list: photos (indices into Data.photos), the one a decision applies to first
    and then the rest of its group; why it is listed."""

    photos: tuple
    why: str


@dataclass
class Data:
    """What the page shows, computed once at start: the photos with the classes their folders give
    them (check.Photo; review.csv is applied in the view only), their names in review.csv, the
    model's probabilities (N x classes; None without weights) and the lists."""

    root: str
    classes: list
    photos: list
    names: list
    probabilities: Optional[np.ndarray]
    lists: dict
    how: str
    sureness: Optional[np.ndarray] = None  # each photo's "not sure" score, the weights' own (calibration.SCORES)


# ---------------------------------------------------------------------------------------------
# Computing the lists
# ---------------------------------------------------------------------------------------------
def load_review_model(weights, default_weights, device, amp, log, class_indices="class_indices.json"):
    """(Classifier, checkpoint dict or {}) of weights, or (None, {}) where the page runs without a
    model: no weights given, the default file missing."""
    if weights == default_weights and not os.path.exists(weights):
        log(f"no weights ({weights} does not exist): listing copies, leakage and unreadable files; "
            "--weights RUN/best.pth adds the model's view (suspect labels, not sure, confidently wrong)")
        return None, {}
    if not classify.weights_format(weights).torch:  # a .onnx file: no checkpoint to read the split from
        return classify.load_classifier(weights, class_indices, device=device, amp=amp, warn=log), {}
    loaded = ckpt.load_checkpoint(weights)  # read once: the classifier is made of it, the page reads its split
    return classify.load_classifier(weights, class_indices, device=device, amp=amp, warn=log, loaded=loaded), loaded


def user_cache_path(root):
    """Where the cache of a page without weights goes: the user's cache folder, one file per data
    folder (named after its absolute path), so that the data folder holds nothing but review.csv."""
    folder = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = hashlib.sha256(os.path.abspath(root).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return os.path.join(folder, USER_CACHE, name + ".json")


def file_key(path):
    try:
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return None


def read_cache(path, root, weights_key):
    """The files' entries of a review cache that is about root ({} for none); their probabilities and
    "not sure" scores only where the weights are the same file as when they were computed."""
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(cached, dict) or cached.get("version") != CACHE_VERSION or cached.get("data") != root:
        return {}
    fields = {"key", "near", "width", "height", "error", "digest", "p", "s"}
    files = {name: entry for name, entry in (cached.get("files") or {}).items()
             if isinstance(entry, dict) and set(entry) == fields}  # an entry of another shape is computed again
    if cached.get("weights") != weights_key:
        for entry in files.values():
            entry["p"] = None
    return files


def hash_with_cache(photos, names, entries):
    """check.hash_photos, with what entries (a cache's, by name) already hold for the files whose
    size and modification time are the same."""
    keys = [file_key(p.path) for p in photos]
    for photo, name, key in zip(photos, names, keys):
        entry = entries.get(name)
        if key is not None and entry and entry.get("key") == key:
            photo.near, photo.error = entry["near"], entry["error"]
            photo.width, photo.height = entry["width"], entry["height"]
            photo.digest = bytes.fromhex(entry["digest"]) if entry.get("digest") else None
    check.hash_photos(photos)
    return keys


def scores_with_cache(classifier, photos, names, keys, entries, log):
    """(N x classes probabilities, N "not sure" scores: the weights' own) of every readable photo (zeros
    for the others): the cache's where its entry is valid, the model's for the rest."""
    table, sureness = np.zeros((len(photos), len(classifier.classes))), np.zeros(len(photos))
    todo = []
    for i, (photo, name, key) in enumerate(zip(photos, names, keys)):
        entry = entries.get(name)
        if photo.error is None and entry and entry.get("key") == key and entry.get("p") is not None:
            table[i], sureness[i] = entry["p"], entry["s"]
        elif photo.error is None:
            todo.append(i)
    if todo:
        log(f"classifying {len(todo):,} photo(s) with the weights (kept for the next start)")
        found, errors, scores = classify.predict(classifier, [photos[i].path for i in todo], workers=1,
                                                 sureness=True)
        for i, p, error, score in zip(todo, found, errors, scores):
            if error:
                photos[i].error = error
            else:
                table[i], sureness[i] = p, score
    return table, sureness


def write_cache(path, root, weights_key, photos, names, keys, scored):
    entries = {}
    for i, (photo, name, key) in enumerate(zip(photos, names, keys)):
        if key is not None:
            entries[name] = {"key": key, "near": photo.near, "width": photo.width, "height": photo.height,
                             "error": photo.error, "digest": photo.digest.hex() if photo.digest else None,
                             "p": [round(float(v), 6) for v in scored[0][i]] if scored and photo.error is None
                             else None,
                             "s": float(scored[1][i]) if scored and photo.error is None else None}
    atomic_write_text(path, json.dumps({"version": CACHE_VERSION, "data": root, "weights": weights_key,
                                        "files": entries}))


def suspect_rows(run_dir, run_cwd, root):
    """{name in root: (given, suggested, score)} of RUN/suspect_labels.csv, in its order, for the
    rows about photos of root ({} where there is none)."""
    path = os.path.join(run_dir, "suspect_labels.csv")
    rows = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                file = os.path.abspath(os.path.join(run_cwd, row["file"]))
                name = review.relative(file, os.path.abspath(root))
                if not name.startswith("../"):
                    rows[name] = (row["given_class"], row["suggested_class"], float(row["score"]))
    except (OSError, KeyError, ValueError):
        return {}
    return rows


def model_lists(d, run_dir, run_cwd, used, log):
    """The suspects, not sure and confidently wrong lists of the training photos; "not sure" by the
    calibration used (the weights' score and threshold, or --min-confidence's top probability)."""
    train = [i for i, p in enumerate(d.photos) if p.part == "train" and p.error is None]
    index = {name: i for i, name in enumerate(d.names)}
    from_run = suspect_rows(run_dir, run_cwd, d.root)
    ranked = [(index[name], given, suggested, score) for name, (given, suggested, score) in from_run.items()
              if name in index and d.photos[index[name]].part == "train"]
    if ranked:
        log(f"suspect labels: the order of {os.path.join(run_dir, 'suspect_labels.csv')} ({len(ranked):,} photos)")
    else:
        where = {p.path: i for i, p in enumerate(d.photos)}
        samples = [(p.path, p.label) for p in d.photos]
        ranked = [(where[file], given, suggested, score) for file, given, suggested, score in
                  labels.ranked_suspects(samples, d.classes, train, d.probabilities[train])]
    suspects = [Item((i,), f"the model suggests {suggested}: p({given}) = {1 - score:.2f}")
                for i, given, suggested, score in ranked]
    top = d.probabilities.max(axis=1)
    best = d.probabilities.argmax(axis=1)
    by_probability = used.score == "max_probability"
    sure = top if by_probability else d.sureness
    unsure = sorted((i for i in train if sure[i] < used.min_confidence), key=lambda i: (sure[i], i))
    wrong = sorted((i for i in train if best[i] != d.photos[i].label and top[i] >= CONFIDENT),
                   key=lambda i: (-top[i], i))
    return {"suspects": suspects,
            "not sure": [Item((i,), f"{SCORE_NAMES[used.score]} {sure[i]:.2f}, below the threshold of "
                                    f"{used.min_confidence:.2f}" + ("" if by_probability else
                                                                    f" (top probability {top[i]:.2f})"))
                         for i in unsure],
            "confidently wrong": [Item((i,), f"the model says {d.classes[best[i]]} with {top[i]:.2f}") for i in wrong]}


def group_lists(d, groups):
    """The copies that stay in one part and those that cross train/val: one item per photo of a group."""
    lists = {"duplicates": [], "leakage": []}
    at = {id(p): i for i, p in enumerate(d.photos)}
    for g in groups:
        members = [at[id(p)] for p in g.photos]
        why = (f"{'exact' if g.kind == 'exact' else 'near'} copies: {len(members)} photos"
               + (" in several classes" if g.spans_classes else "") + (", in train and val" if g.crosses_split else ""))
        for k, i in enumerate(members):
            lists["leakage" if g.crosses_split else "duplicates"].append(Item((i, *members[:k], *members[k + 1:]), why))
    return lists


def compute_review_data(root, weights, default_weights, device="auto", amp="auto", min_confidence=None, log=print,
            class_indices="class_indices.json"):
    """Data of root: its photos and every list, with the weights' view where there are weights."""
    classifier, loaded = load_review_model(weights, default_weights, device, amp, log, class_indices) if weights \
        else (None, {})
    split = loaded.get("split")
    if split and not all(os.path.isfile(os.path.join(root, *f.split("/"))) for f in split["val_files"]):
        split = None  # a run of another folder: DIR is split as train.py splits it afresh
    found = check.find_photos(root, recorded_split=split)
    classes, photos, how = found.classes, found.photos, found.how
    if classifier is not None and list(classifier.classes) != list(classes):
        mismatch = (f"{weights} knows the classes {', '.join(classifier.classes)} and {root} has "
                    f"{', '.join(classes)}: pass the --weights of a run trained on {root}")
        if weights != default_weights:
            raise UserError(mismatch + ", or none")
        log(f"note: {mismatch}; without them the page lists copies, leakage and unreadable files")
        classifier, loaded = None, {}
    # a bad file is refused now, not on the first key
    review.check_decisions(review.read(root, FIX), root, classes, FIX)
    names = [review.relative(p.path, root) for p in photos]
    run_dir = os.path.dirname(os.path.abspath(weights)) if classifier is not None else None
    cache_path = os.path.join(run_dir, CACHE) if run_dir else user_cache_path(root)
    weights_key = file_key(weights) if classifier is not None else None
    entries = read_cache(cache_path, os.path.abspath(root), weights_key)
    keys = hash_with_cache(photos, names, entries)
    scored = scores_with_cache(classifier, photos, names, keys, entries, log) if classifier else None
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        write_cache(cache_path, os.path.abspath(root), weights_key, photos, names, keys, scored)
    except OSError as e:  # SaveError too
        log(f"note: {e} (the next start computes it again)")
    probabilities, sureness = scored or (None, None)
    d = Data(root, classes, photos, names, probabilities, {}, how, sureness)
    groups = check.exact_groups(photos) + check.near_groups(photos, images.NEAR_COPY_BITS)
    if classifier is not None:
        classifier.calibration = classifier.calibration.with_min_confidence(min_confidence)
        d.lists.update(model_lists(d, run_dir, (loaded.get("args") or {}).get("cwd") or os.getcwd(),
                                   classifier.calibration, log))
    d.lists.update(group_lists(d, groups))
    d.lists["unreadable"] = [Item((i,), p.error) for i, p in enumerate(photos) if p.error is not None]
    return d


# ---------------------------------------------------------------------------------------------
# The view
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def preview(path, side):
    """A data: URL of the photo, its longer side at most side px (JPEG), or None if it cannot be read."""
    try:
        image = images.load_image(path, min_side=side)
    except Exception:  # listed as unreadable; the caption says why
        return None
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def decided(decision):
    if decision is None:
        return "undecided"
    what = f"relabelled to {decision.new_class}" if decision.action == "relabel" else decision.action
    return f"<b>{html.escape(what)}</b> ({html.escape(decision.time)})"


def figure(d, i, side, current, decision):
    photo, e = d.photos[i], html.escape
    url = preview(photo.path, side) if photo.error is None else None
    # shown at a fixed height, so that a small photo is not a stamp and a group lines up
    picture = (f'<img src="{url}" alt="{e(d.names[i])}" style="height: {side * 3 // 4}px; width: auto">' if url else
               f"<p>cannot be shown: {e(photo.error or '')}</p>")
    lines = [f"<b>{e(d.names[i])}</b>",
             f"{photo.width} x {photo.height} px, {max(photo.size, 0) / 1024:,.0f} KB",
             f"given: {e(d.classes[photo.label])} ({photo.part})"]
    if d.probabilities is not None and photo.error is None:
        order = np.argsort(-d.probabilities[i], kind="stable")[:3]
        lines.append("model: " + ", ".join(f"{e(d.classes[k])} {d.probabilities[i][k]:.2f}" for k in order))
    lines.append("decision: " + decided(decision))
    return (f'<figure class="{"current" if current else "other"}" data-name="{e(d.names[i])}">{picture}'
            f'<figcaption>{"<br>".join(lines)}</figcaption></figure>')


def item_html(d, kind, index, decisions):
    items = d.lists.get(kind, [])
    if not items:
        return f"<p>The list <b>{html.escape(KINDS[kind])}</b> is empty.</p>"
    item = items[index]
    side = PHOTO_SIDE if len(item.photos) == 1 else GROUP_SIDE
    figures = "".join(figure(d, i, side, k == 0, decisions.get(d.names[i])) for k, i in enumerate(item.photos))
    return (f"<p><b>{html.escape(KINDS[kind])}: {index + 1} of {len(items)}</b>, {html.escape(item.why)}"
            + (" (the outlined photo is the one decided)" if len(item.photos) > 1 else "") + f"</p>{figures}")


def review_summary(d, decisions, kind):
    after = Counter()
    for photo, name in zip(d.photos, d.names):
        decision = decisions.get(name)
        if decision is not None and decision.action == "exclude":
            continue
        after[decision.new_class if decision is not None and decision.action == "relabel"
              else d.classes[photo.label]] += 1
    given = Counter(d.classes[p.label] for p in d.photos)
    parts = Counter(p.part for p in d.photos)
    counts = review.counts(decisions)
    in_list = {d.names[item.photos[0]] for item in d.lists.get(kind, [])}
    lines = [f"**{html.escape(d.root)}**: {len(d.photos):,} photos ({parts['train']:,} train, {parts['val']:,} val; "
             f"{html.escape(d.how)})",
             "photos per class (as the folders have them → after review.csv): "
             + ", ".join(f"{html.escape(c)} {given[c]:,} → {after[c]:,}" for c in d.classes),
             "lists: " + " · ".join(f"{KINDS[k]} {len(v):,}" for k, v in d.lists.items()),
             f"decided: {len(decisions):,} photos ({counts['exclude']:,} excluded, {counts['relabel']:,} relabelled, "
             f"{counts['keep']:,} kept) in {html.escape(review.path_of(d.root))}; in this list "
             f"{len(in_list & decisions.keys()):,} of {len(in_list):,}",
             "keys: " + ", ".join(f"{(k + 1) % 10} {html.escape(c)}" for k, c in enumerate(d.classes[:10]))
             + ", x exclude, k keep, ← → move"]
    return "\n\n".join(lines)


def recent(decisions):
    latest = review.latest(decisions, RECENT)
    if not latest:
        return "No decisions yet."
    rows = [f"| {html.escape(x.file)} | {x.action} | {html.escape(x.new_class)} | {html.escape(x.time)} |"
            for x in latest]
    return "Latest decisions:\n\n| file | action | class | time |\n| --- | --- | --- | --- |\n" + "\n".join(rows)


class Page:
    """The page's handlers: each takes the list's name and the position the browser holds, never a
    path, and answers with the whole view."""

    def __init__(self, d):
        self.d = d

    def position(self, kind, index):
        import gradio as gr

        if kind not in self.d.lists:
            raise gr.Error(f"no list named {kind!r}")
        count = len(self.d.lists[kind])
        try:
            return min(max(int(index), 0), max(count - 1, 0))
        except (TypeError, ValueError):
            return 0

    def view(self, kind, index):
        import gradio as gr

        index = self.position(kind, index)
        try:
            decisions = review.read(self.d.root, FIX)
        except review.ReviewError as e:  # edited by hand while the page runs
            raise gr.Error(str(e), print_exception=False) from None
        return (review_summary(self.d, decisions, kind), item_html(self.d, kind, index, decisions), recent(decisions),
                index)

    def first(self, kind):
        return self.view(kind, 0)

    def move(self, kind, index, step):
        return self.view(kind, self.position(kind, index) + step)

    def decide(self, kind, index, action, class_index=None):
        """Append the decision about the item's photo to review.csv, then show the next item."""
        import gradio as gr

        index = self.position(kind, index)
        items = self.d.lists[kind]
        if not items:
            raise gr.Error("this list is empty: choose another")
        photo = items[index].photos[0]
        name = self.d.names[photo]
        if action == "relabel" and class_index == self.d.photos[photo].label:
            action = "keep"  # relabelled to the class it has: kept
        new_class = self.d.classes[class_index] if action == "relabel" else ""
        try:
            review.append(self.d.root, [(name, action, new_class)])
        except OSError as e:  # the folder turned read-only or full while the page ran: not a bug
            message = (f"cannot write {review.path_of(self.d.root)} ({e.strerror or e}): this decision about {name} "
                       "is not recorded; make the folder writable (or free some space) and decide again")
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise gr.Error(message, print_exception=False) from None
        print(f"{name}: {action} {new_class}".rstrip(), flush=True)
        return self.view(kind, index + 1)


def build_review_page(d):
    import gradio as gr

    page = Page(d)
    choices = [(f"{KINDS[k]} ({len(v):,})", k) for k, v in d.lists.items()]
    start = next((k for k, v in d.lists.items() if v), next(iter(d.lists)))
    with gr.Blocks(title=f"Review {d.root}") as blocks:
        summary_box = gr.Markdown(elem_id="review-summary")
        kind = gr.Radio(choices, value=start, label="list", elem_id="review-list")
        with gr.Row():
            previous = gr.Button("← previous", elem_id="review-previous")
            following = gr.Button("next →", elem_id="review-next")
        item = gr.HTML(elem_id="review-item")
        with gr.Row():
            keep = gr.Button("k: keep", elem_id="review-keep")
            relabel = [gr.Button(f"{(k + 1) % 10 if k < 10 else ''}: {c}" if k < 10 else c, elem_id=f"review-class-{k}")
                       for k, c in enumerate(d.classes)]
            exclude = gr.Button("x: exclude", variant="stop", elem_id="review-exclude")
        recent_box = gr.Markdown(elem_id="review-recent")
        index = gr.State(0)
        shown = [summary_box, item, recent_box, index]
        private = {"api_visibility": "private"}
        blocks.load(page.view, [kind, index], shown, **private)
        kind.change(page.first, [kind], shown, **private)
        previous.click(functools.partial(page.move, step=-1), [kind, index], shown, **private)
        following.click(functools.partial(page.move, step=1), [kind, index], shown, **private)
        # trigger_mode once: a key pressed again before the answer came would decide the same item twice
        decision = {"trigger_mode": "once", **private}
        keep.click(functools.partial(page.decide, action="keep"), [kind, index], shown, **decision)
        exclude.click(functools.partial(page.decide, action="exclude"), [kind, index], shown, **decision)
        for k, button in enumerate(relabel):
            button.click(functools.partial(page.decide, action="relabel", class_index=k), [kind, index], shown,
                         **decision)
    return blocks


def check_writable(root):
    """Refuse a data folder where no decision could be written (read-only, full, review.csv a link
    to nowhere) before the lists are computed: each decision would fail, after the work of making it."""
    if not os.path.isdir(root):
        return  # find_photos says what is wrong with it
    path = review.path_of(root)
    try:
        probe_writable(root)
        if os.path.lexists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))  # opened as append opens it, without making it
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}): the page appends every decision to it; "
                        f"pass --data-path a writable copy of {root}") from None


def main(args, default_weights):
    """app.py --review: compute the lists, then serve the page until Ctrl-C or a terminate."""
    if not args.data_path:
        raise UserError("--review needs --data-path DIR: the folder of photos to review (as train.py's)")
    check_writable(args.data_path)
    log = functools.partial(print, flush=True)
    d = compute_review_data(args.data_path, args.weights, default_weights, args.device, args.amp, args.min_confidence,
                            log, args.class_indices)
    with serving.private_folder("googlenet-review-") as folder:
        blocks = build_review_page(d)
        log(f"reviewing {d.root} on http://{args.host}:{args.port}: "
            + ", ".join(f"{KINDS[k]} {len(v):,}" for k, v in d.lists.items())
            + f"; decisions are appended to {review.path_of(d.root)}; the page's own files are in {folder} "
            "until it stops")
        serving.serve(blocks, args.host, args.port, js=KEYS, css=CSS, max_file_size=1024)  # it takes no uploads
    return 0
