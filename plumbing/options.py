"""The scripts' argument types, their user-error base and run_command, the one way a command reports
one: a number out of range is argparse's one-line error naming the option ("argument --lr: must be
above 0, got -1"), never a traceback from deep inside."""
import argparse
import math
import sys


class UserError(Exception):
    """Something the user can put right (a path, a file, an option's value): the scripts print
    "error: <message>" as one line and exit with exit_code, never with a traceback.

    Raise a plain UserError("what is wrong: what to do"); the message says which it is. A kind of
    its own is kept only where something tells it apart: a caller that catches it by name, another
    exit code, or attributes of its own. Every kind, where it is raised, its exit code and why it is
    one (tests/test_docs.py keeps this table whole):

    ===============  =======================  ====  ==============================================================
    class            module                   exit  why it is a kind of its own
    ===============  =======================  ====  ==============================================================
    TrainingError    training/step.py         1     exit 1: a run that cannot go on
    CamError         inference/visualize.py   2     app.py catches it: the page shows it, the classes still come
    PeerFailed       plumbing/distributed.py  1     exit 1 and no message: another process printed why
    OutOfSync        plumbing/distributed.py  1     exit 1: the processes' weights differ, the run is broken
    FolderInUse      plumbing/run_lock.py     1     exit 1; .holder: the lock's holder (None: unreadable)
    CannotLock       plumbing/run_lock.py     1     exit 1: the lock file itself cannot be written
    SaveError        plumbing/atomic.py       1     exit 1; an OSError too (errno, .path, .hint): a write failed
    ReviewError      data_set/review.py       2     data_set/review_page.py catches it: a message on the page
    ExportError      export.py                2     benchmarks/benchmark.py catches it: leaves the onnx column out
    Upload           app.py                   2     app.py catches it: the page shows it for that upload
    ===============  =======================  ====  ==============================================================
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
