"""Serving a Gradio page, the one way app.py's pages do it: everything the page stores lives in a
private folder that goes when the page stops, however it stops (Ctrl-C, a terminate, a failed start)."""
import contextlib
import os
import shutil
import signal
import tempfile

from plumbing.options import UserError


@contextlib.contextmanager
def private_folder(prefix):
    """A new folder for the page's own files, with Gradio's under FOLDER/gradio (Gradio reads
    GRADIO_TEMP_DIR when it is imported, so the page is built inside this block). A terminate (a
    service manager's stop) ends the page as Ctrl-C does, so the folder is removed either way."""
    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    folder = os.path.realpath(tempfile.mkdtemp(prefix=prefix))
    try:
        os.environ["GRADIO_TEMP_DIR"] = os.path.join(folder, "gradio")
        yield folder
    finally:
        for stop in handlers:  # a second Ctrl-C or terminate must not cut the removal short
            signal.signal(stop, signal.SIG_IGN)
        shutil.rmtree(folder, ignore_errors=True)
        for stop, handler in handlers.items():
            signal.signal(stop, handler)


def serve(blocks, host, port, **launch_options):
    """Serve blocks on host:port until Ctrl-C or a terminate, one request at a time."""
    try:
        # show_error=False: the message of a bug (which may name a server path) stays in the log;
        # the browser still gets every message raised for it (gr.Error)
        blocks.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, show_error=False,
                                                         quiet=True, **launch_options)
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port} ({e}): pass --port with a free port") from None
    except KeyboardInterrupt:  # stopped while it was starting (once started, Gradio ends it the same way)
        blocks.close()
