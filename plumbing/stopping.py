"""StopRequest: the first Ctrl-C or SIGTERM asks a run to stop at its next clean point (train.py after
the step in hand, predict.py after the batch in hand, whose rows are then written whole); a second
one stops it at once. It imports no torch, so predict.py on a .onnx file may use it."""
import signal
import threading


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag (the signal caught, or None). The handlers are put in when it
    is made (in the main thread: no other may set them); `with` puts the previous ones back at its end."""

    def __init__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signal = signum

    def check(self, device, diverged=False, unreadable=False):
        """(diverged, stop requested, an unreadable image under --bad-images error), each anywhere:
        every process of a training run acts at the same step."""
        from plumbing import distributed  # here: predict.py on a .onnx file never imports torch

        return distributed.any_process([diverged, self.signal is not None, unreadable], device)
