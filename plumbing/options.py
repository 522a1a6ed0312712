"""The scripts' argument types, their user-error base and run_command, the one way a command reports
one: a number out of range is argparse's one-line error naming the option ("argument --lr: must be
above 0, got -1"), never a traceback from deep inside."""
import argparse
import math
import sys


class UserError(Exception):
    """Something the user can put right (a path, a file, an option's value): the scripts print
    "error: <message>" as one line and exit with exit_code, never with a traceback.

    Every kind of it, where it is raised and its exit code; a caller that catches one by name is
    noted (tests/test_docs.py keeps this table whole):

    ================  =========================  ====  ==========================================
    class             module                     exit  caught by name in
    ================  =========================  ====  ==========================================
    DataError         training/data.py           2
    TrainingError     training/step.py           1
    CheckpointError   inference/checkpoint.py    2
    PredictionError   inference/classify.py      2
    OnnxError         inference/runtimes.py      2
    CamError          inference/visualize.py     2     app.py (shown on the page)
    DeviceError       plumbing/device.py         2
    PeerFailed        plumbing/distributed.py    1     (empty: another process printed why)
    OutOfSync         plumbing/distributed.py    1
    FolderInUse       plumbing/run_lock.py       1
    CannotLock        plumbing/run_lock.py       1
    SaveError         plumbing/atomic.py         1     data_set/review_page.py (also an OSError)
    ReviewError       data_set/review.py         2     data_set/review_page.py
    ReviewPageError   data_set/review_page.py    2
    ExportError       export.py                  2     benchmarks/benchmark.py
    ReportError       report.py                  2
    Upload            app.py                     2     app.py (shown on the page)
    BenchmarkError    benchmarks/trust.py        2
    PictureSetError   benchmarks/non_flowers.py  2
    ================  =========================  ====  ==========================================
    """

    exit_code = 2


def run_command(main, args):
    """main(args) as a command's whole run: a UserError ends in its one line on stderr and its exit
    code (none when another process already printed it), Ctrl-C in "interrupted" and 130."""
    try:
        return main(args)
    except UserError as e:
        if str(e):
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def given_options(parser, argv):
    """{option: value} of the options typed on the command line (argv), defaults left out: what
    was given explicitly, even where its value is the default's."""
    defaults = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except None: such options say in their help what they default to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _number(kind, text):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def _checked(kind, ok, rule):
    def parse(text):
        value = _number(kind, text)
        if not ok(value) or value != value:  # NaN compares unequal to itself
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = f"{kind.__name__} {rule}"
    return parse


positive_int = _checked(int, lambda v: v >= 1, "at least 1")
non_negative_int = _checked(int, lambda v: v >= 0, "0 or more")
positive_float = _checked(float, lambda v: 0 < v < float("inf"), "above 0")
non_negative_float = _checked(float, lambda v: 0 <= v < float("inf"), "0 or more")
probability = _checked(float, lambda v: 0 <= v <= 1, "between 0 and 1")
open_fraction = _checked(float, lambda v: 0 < v < 1, "between 0 and 1 (exclusive)")
below_one = _checked(float, lambda v: 0 <= v < 1, "at least 0 and below 1")
share = _checked(float, lambda v: 0 < v <= 1, "above 0 and at most 1")
finite_float = _checked(float, math.isfinite, "a finite number")
image_size = _checked(int, lambda v: v >= 32, "at least 32 (pixels)")  # GoogLeNet halves it 5 times
seed = non_negative_int


def size_schedule(text):
    """--image-size: one size (128), or a schedule first:last (96:160) whose ends are multiples of 32."""
    first, _, last = text.partition(":")
    sizes = (image_size(first), image_size(last or first))
    if last and (sizes[0] > sizes[1] or sizes[0] % 32 or sizes[1] % 32):
        raise argparse.ArgumentTypeError(f"a size schedule grows in steps of 32: FIRST:LAST with FIRST <= LAST, "
                                         f"both multiples of 32 (96:160, say), got {text}")
    return sizes


size_schedule.__name__ = "size or FIRST:LAST"
