"""A demo page: drop, paste or pick a photo and see its classes (and, for .pth weights, where the
network looked), served by Gradio on this machine.

    python app.py                                   # weights/best.pth on http://127.0.0.1:7860
    python app.py --weights googlenet.onnx --examples photos/ --port 8080
    python app.py --host 0.0.0.0                    # reachable from other machines

It classifies through predict.py's code (the same loader, preprocessing and calibrated softmax, so
the page shows predict.py's numbers), and says "not sure", with its best guesses, where predict.py
answers "unknown": the weights' "not sure" score below their threshold, or the top probability below
--min-confidence. What people upload is not
always a photo: every file the loader cannot use gets a message on the page and one line in the
server's log, and the server goes on serving.

What the page stores lives in one folder of its own (holding Gradio's temporary folder,
GRADIO_TEMP_DIR): an upload larger than --max-upload-mb is refused while it arrives (an image sent
as a data: URL instead, before it is decoded; it is read from memory, never written), an upload is
deleted once answered, what Gradio keeps (the heat maps sent, uploads never asked about) goes after
a few minutes, and the folder is removed when the page stops (Ctrl-C or a terminate). The page reads
only what was uploaded to it: a request that names a file on the server, or a link for the server
to fetch, is refused like a file that is no photo, with one line in the log.
"""
import argparse
import base64
import collections
import functools
import importlib.util
import io
import math
import os
import sys
import warnings

import numpy as np
from PIL import Image

from inference import classify, images, visualize
from inference.calibration import SCORE_NAMES, UNKNOWN
from plumbing import options, serving
from plumbing.options import UserError

MISSING = "the demo page needs gradio, an optional dependency: pip install gradio"
TOP = 5  # classes shown
FORMATS = "a JPEG, PNG, WebP, GIF, BMP or TIFF photo"
# Gradio's delete_cache (every, older than; seconds): what the page stored and no answer deleted (a
# heat map, which the browser fetches once the answer is shown; an upload nobody asked about) goes
# within 1-3 minutes. An upload still waiting in the queue after 2 minutes goes too (its sender is
# asked to send it again): the price of a bound on the disk that does not depend on the queue.
DELETE_CACHE = (60, 120)
RECENT_ANSWERS = 32


def get_args_parser():
    p = argparse.ArgumentParser(description="Serve a page that classifies uploaded photos with a trained GoogLeNet.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default=os.path.join("weights", "best.pth"),
                   help="a checkpoint from train.py (with a Grad-CAM heat map) or a .onnx file from export.py")
    p.add_argument("--class-indices", default="class_indices.json",
                   help="class names, used only when the weights file does not hold them")
    p.add_argument("--examples", default=None, metavar="DIR", help="a folder of photos offered as examples")
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0: every network interface)")
    p.add_argument("--port", type=options.positive_int, default=7860, help="the port to serve on")
    p.add_argument("--max-upload-mb", type=options.positive_int, default=20, metavar="MB",
                   help="the largest upload the server accepts (1 MB = 2^20 bytes); a larger one is refused "
                        "while it arrives, and the page says so (an image sent as a data: URL: before it is "
                        "decoded)")
    p.add_argument("--cam-layer", default="inception5b", choices=visualize.LAYERS,
                   help="the layer whose output the heat map weighs")
    p.add_argument("--min-confidence", type=options.probability, default=None, metavar="P",
                   help="say \"not sure\" (with the best guesses) for a photo whose top probability is below P, in "
                        "place of the weights' own \"not sure\" score and threshold (default: those the weights "
                        "record; 0: always name a class)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (a .onnx file: as in predict.py, the GPU through "
                        "onnxruntime-gpu)")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision, as in train.py")
    p.add_argument("--review", action="store_true",
                   help="serve the data review page instead: --data-path's suspect labels, copies, train/val "
                        "leakage and unreadable files, kept, relabelled or excluded with a key press into "
                        "DIR/review.csv, which train.py applies (with the model's view where --weights exists: "
                        "the default file may be missing); --examples, --max-upload-mb and --cam-layer are the "
                        "classify page's and refused with it")
    p.add_argument("--data-path", default=None, metavar="DIR",
                   help="with --review (and only with it): the data folder, as train.py's")
    return p


class Upload(UserError):
    """An upload that is not a usable photo: the page shows the message."""


def read_upload(source, name):
    """The upright RGB photo of an uploaded file (a path, or the bytes of a pasted image), through
    the project's one loader; an Upload error that says what is wrong for anything else, naming the
    file by name (the uploader's own file name: the server's paths are not the browser's business).
    Pillow's decompression-bomb limit (89 megapixels) is a hard limit here: a file that claims more
    is refused before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return images.load_image(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Upload(f"This image is too large to be a photo ({e}). Upload one of at most "
                     f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels.") from None
    except Exception as e:  # any failure of the decoder means the same to the person uploading
        detail = str(e).replace(str(source), name).split(":")[0] if str(e) else type(e).__name__
        raise Upload(f"This file cannot be read as an image ({detail}). Upload {FORMATS}.") from None


class Demo:
    """The model behind the page: one photo in, the top classes (and a heat map) out."""

    def __init__(self, classifier, cam_layer):
        self.classifier, self.cam_layer = classifier, cam_layer

    def classify(self, source, name="the upload"):
        """({class: probability} of the top classes, the Grad-CAM picture or None, a note) of a file
        (a path or a file object). A photo the model is not sure about (classify.decided_class:
        "unknown") gets a note that says so first."""
        pixels = images.resize_and_crop(read_upload(source, name), self.classifier.preprocessing)
        probabilities, sureness = (a[0] for a in self.classifier.assess(pixels[None]))
        order = np.argsort(-probabilities, kind="stable")
        classes, used = self.classifier.classes, self.classifier.calibration
        top = {classes[k]: float(probabilities[k]) for k in order[:TOP]}
        doubt = ""
        if classify.decided_class(classes, probabilities, used.min_confidence, sureness) == UNKNOWN:
            guesses = ", ".join(f"{classes[k]} {probabilities[k]:.2f}" for k in order[:3])
            wanted = (f"no class reaches the probability of {used.min_confidence:.2f} this page asks for"
                      if used.score == "max_probability" else
                      f"its {SCORE_NAMES[used.score]} {sureness:.2f} is below the {used.min_confidence:.2f} this page "
                      "asks for")
            doubt = f"**Not sure**: {wanted}. Best guesses: {guesses}. "
        if self.classifier.torch_model is None:
            return top, None, doubt + ("The heat map needs PyTorch weights: start the page with the .pth file "
                                       "this .onnx file was exported from.")
        best = int(order[0])
        try:
            heat = self.heat_map(pixels, best)
        except visualize.CamError as e:  # captum missing: the classes still come, the page says why
            return top, None, doubt + f"No heat map: {e}."
        guess = "?" if doubt else ""
        caption = f"{classes[best]}{guess} {probabilities[best]:.2f} ({self.cam_layer})"
        note = doubt + f"Grad-CAM of {'the best guess ' if doubt else ''}{classes[best]} at {self.cam_layer}."
        return top, visualize.overlay(pixels, heat, caption), note

    def heat_map(self, pixels, target):
        import torch

        model = self.classifier.torch_model
        x = torch.from_numpy(images.normalize(pixels[None], self.classifier.preprocessing))
        x = x.to(next(model.parameters()).device, memory_format=torch.channels_last)
        return visualize.grad_cam(model, x, torch.tensor([target], device=x.device), self.cam_layer)[0].cpu()


def upload_path(payload):
    """(the file behind Gradio's upload payload, the name messages call it by). Gradio names an upload
    after the sender's file. Whether the file is an upload of this page is Uploads.answer's to say:
    a request can name any path."""
    if payload is None:
        raise Upload(f"Drop, paste or pick {FORMATS} first.")
    path = payload if isinstance(payload, str) else payload.get("path")
    if not path:
        raise Upload(f"Nothing was uploaded: drop, paste or pick {FORMATS}.")
    return path, os.path.basename(path)


def data_url(payload):
    """The data: URL a pasted or webcam image may come as instead of an upload, or None."""
    url = payload.get("url") if isinstance(payload, dict) and not payload.get("path") else None
    return url if isinstance(url, str) and url.startswith("data:") and "," in url else None


def pasted_image(url, limit):
    """The bytes of a data: URL as a file object, held to the upload limit (limit bytes, Gradio's
    max_file_size) before they are decoded: base64's length says the size, 3 bytes in 4 characters."""
    encoded = url.split(",", 1)[1]
    size = len(encoded) * 3 // 4 - encoded[-2:].count("=")
    if size > limit:
        raise Upload(f"This image is {size / 2 ** 20:.1f} MB, over the page's limit of {limit / 2 ** 20:g} MB: "
                     "send a smaller one.")
    try:
        return io.BytesIO(base64.b64decode(encoded, validate=True))
    except ValueError:  # binascii.Error, or a character that is not ASCII
        raise Upload(f"This pasted image is not base64 data: drop, paste or pick {FORMATS}.") from None


def not_uploaded(what):
    return Upload(f"{what} is not among the page's uploads (each is deleted once it is answered): "
                  "drop, paste or pick it again.")


HEAT_MAP = "where-it-looked.webp"


class Uploads:
    """Answers a photo only when it is an upload of this page (or one of its examples), deletes each
    upload once it is answered, and answers it again once it is gone.

    A request names a file by its path, and without Gradio's meta field its check that the file was
    uploaded is skipped (the events have preprocess=False): so a path this page did not receive is
    refused here, with the message of a file that is gone, whether it exists or not.
    Gradio stores an upload under the hash of its bytes and its file name, so one path is one photo:
    the last answers are kept by path, for the button pressed after the automatic answer and for two
    people sending the same photo at once (the first answer deletes the file the second was to read).
    Both events of the page call the same function, so Gradio runs them one at a time."""

    def __init__(self, page):
        self.page = page
        self.answers = collections.OrderedDict()

    def answer(self, path, name, classify):
        examples = set().union(*(getattr(block, "keep_in_cache", ()) for block in self.page.blocks.values()))
        upload = path in self.answers or (path in self.page.upload_file_set and path not in examples)
        try:
            if path in self.answers:
                self.answers.move_to_end(path)
                outcome = self.answers[path]
            elif not ((upload or path in examples) and os.path.exists(path)):
                outcome = not_uploaded(f"This photo ({name})")
            else:
                try:
                    outcome = classify(path, name)
                except Upload as e:
                    outcome = e
                if upload:
                    self.answers[path] = outcome
                    if len(self.answers) > RECENT_ANSWERS:
                        self.answers.popitem(last=False)
        finally:
            if upload:
                self.delete(path)
        if isinstance(outcome, Upload):
            raise outcome
        return outcome

    def delete(self, path):
        # Gradio's notes of the file go too: its delete_cache skips a file that is already gone,
        # so they would stay in memory for good
        for files in self.page.temp_file_sets:
            files.discard(path)
        import anyio.from_thread

        # in the server's event loop, between two of its steps: its upload route makes the folder of
        # an upload and moves the file in within one step, so another upload of the same bytes
        # cannot lose its folder halfway (it did, from this worker thread, under 20 clients)
        anyio.from_thread.run_sync(remove_upload, path)


def remove_upload(path):
    try:
        os.remove(path)
        os.rmdir(os.path.dirname(path))  # the upload's own folder, named after its hash
    except OSError:  # gone already, or the folder holds the same bytes under another name
        pass


def build_page(demo, folder, examples=None):
    """The page; folder: where app.py writes files of its own (outside Gradio's temporary folder)."""
    import gradio as gr
    from gradio.exceptions import InvalidPathError
    from gradio_client import utils as client_utils

    def refused(name, e):
        # what someone sent is not a bug: one line in the log, no traceback, the message on the page
        print(f"refused {name}: {e}", file=sys.stderr, flush=True)
        return gr.Error(str(e), duration=None, print_exception=False)

    def no_links(payload):
        if client_utils.is_http_url_like(payload["path"]):
            raise Upload("The page does not fetch links: download the photo, then drop, paste or pick it.")
        return payload

    class Page(gr.Blocks):
        """Blocks that check a request's files before Gradio acts on them: in place of an upload Gradio
        fetches a link (whatever its size) and refuses a server path with a traceback in the log."""

        async def preprocess_data(self, block_fn, inputs, *args, **kwargs):
            try:
                client_utils.traverse(inputs, no_links, client_utils.is_file_obj_with_meta)
                return await super().preprocess_data(block_fn, inputs, *args, **kwargs)
            except Upload as e:
                raise refused("a request", e) from None
            except InvalidPathError:  # Gradio's own check: not a file uploaded to it
                raise refused("a request", not_uploaded("The file this request names")) from None
            except ValueError as e:  # a payload of the wrong shape (pydantic's ValidationError), too few inputs
                reason = str(e).splitlines()[0]
                raise refused("a request", Upload(f"This request is not an upload ({reason}): drop, paste or "
                                                  f"pick {FORMATS}.")) from None

    def answer(payload):
        name = "the upload"
        try:
            url = data_url(payload)
            if url:
                name = "the pasted image"
                pasted = pasted_image(url, getattr(page, "max_file_size", None) or math.inf)
                top, heat, note = demo.classify(pasted, name)
            else:
                path, name = upload_path(payload)
                top, heat, note = uploads.answer(path, name, demo.classify)
            if heat is not None:
                # handed to Gradio as a file: it copies a file into its cache whole (a new name, then
                # a rename), where it would rewrite the picture of the same photo in place, under a
                # browser still downloading it
                heat.save(os.path.join(folder, HEAT_MAP))
                heat = os.path.join(folder, HEAT_MAP)
            return top, heat, note
        except Upload as e:
            raise refused(name, e) from None

    with Page(title="GoogLeNet flower classifier", delete_cache=DELETE_CACHE) as page:
        gr.Markdown(f"## GoogLeNet: {', '.join(demo.classifier.classes)}\n"
                    "Drop, paste or pick a photo; the answer appears on the right.")
        with gr.Row():
            photo = gr.Image(label="photo", type="filepath", sources=["upload", "clipboard", "webcam"])
            with gr.Column():
                label = gr.Label(label="classes", num_top_classes=TOP, elem_id="classes")
                heat = gr.Image(label="where it looked (Grad-CAM)", type="pil", interactive=False)
                note = gr.Markdown()
        button = gr.Button("Classify", variant="primary")
        # preprocess=False: the upload reaches the project's own loader untouched, so a file that is
        # no photo gets this page's message, not the framework's (Uploads checks the file was uploaded)
        button.click(answer, inputs=photo, outputs=[label, heat, note], preprocess=False, api_name="classify")
        photo.upload(answer, inputs=photo, outputs=[label, heat, note], preprocess=False, api_visibility="private")
        if examples:
            gr.Examples(examples=[[p] for p in examples], inputs=photo)
    uploads = Uploads(page)
    return page


def main(args, given=()):
    """given: the options typed on the command line; one the page served would not use is refused."""
    refuse_unused_options(args, given)
    if importlib.util.find_spec("gradio") is None:
        raise UserError(MISSING)
    if args.review:  # the data review page: data_set/review_page.py
        from data_set import review_page

        return review_page.main(args, default_weights=get_args_parser().get_default("weights"))
    examples = None
    if args.examples:
        if not os.path.isdir(args.examples):
            raise UserError(f"--examples {args.examples} is not a folder: pass a folder of photos")
        examples = images.find_image_files(args.examples)[:12]
        if not examples:
            raise UserError(f"--examples {args.examples} holds no images ({', '.join(images.IMAGE_EXTENSIONS)})")
    classifier = classify.load_classifier(args.weights, args.class_indices, args.device, args.amp,
                                         warn=lambda line: print(line, file=sys.stderr))
    classifier.calibration = classifier.calibration.with_min_confidence(args.min_confidence)
    with serving.private_folder("googlenet-app-") as folder:
        os.mkdir(os.path.join(folder, "page"))  # app.py's own files: heat maps, examples
        blocks = build_page(Demo(classifier, args.cam_layer), os.path.join(folder, "page"), examples)
        print(f"serving {args.weights} ({len(classifier.classes)} classes) on http://{args.host}:{args.port}; "
              f"uploads up to {args.max_upload_mb} MB, kept in {folder} until answered", flush=True)
        serving.serve(blocks, args.host, args.port, max_file_size=args.max_upload_mb * 2 ** 20)
    return 0


CLASSIFY_PAGE_ONLY = ("--examples", "--max-upload-mb", "--cam-layer")  # options --review's page has no use for


def refuse_unused_options(args, given):
    if args.review:
        unused = [o for o in CLASSIFY_PAGE_ONLY if o[2:].replace("-", "_") in given]
        if unused:
            raise UserError(f"{', '.join(unused)}: {'an option' if len(unused) == 1 else 'options'} of the classify "
                            f"page, which --review does not serve: leave {'it' if len(unused) == 1 else 'them'} out")
    elif "data_path" in given:
        raise UserError("--data-path is the folder of the data review page: add --review to review it, or leave "
                        "--data-path out for the classify page")


def run(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    return options.run_command(functools.partial(main, given=options.given_options(parser, argv)), args)


if __name__ == "__main__":
    sys.exit(run())
