"""plumbing/options.py's argument types: every number a user types is checked when the arguments
are parsed, by every command (argparse's one-line error naming the option, exit status 2, never a
traceback), and the checks that need two options at once come before anything is loaded."""
import argparse
import importlib.util
import sys

import pytest

import export
import predict
import train
from data_set import split_data
from helpers import REPO
from plumbing import options

pytestmark = pytest.mark.quick

BAD_VALUES = {  # per type: values it must refuse
    options.positive_int: ["0", "-3", "2.5", "x"],
    options.non_negative_int: ["-1", "1.5", "x"],
    options.seed: ["-1", "x"],
    options.image_size: ["16", "0", "x"],
    options.positive_float: ["0", "-1e-3", "nan", "inf", "x"],
    options.non_negative_float: ["-0.1", "nan", "inf", "x"],
    options.probability: ["-0.1", "1.01", "nan", "x"],
    options.open_fraction: ["0", "1", "nan", "x"],
    options.below_one: ["-0.1", "1", "nan", "x"],
    options.size_schedule: ["16", "x", "100:160", "160:96", "96:16"],
    options.share: ["0", "1.5", "nan", "x"],
    options.finite_float: ["nan", "inf", "-inf", "x"],
}
GOOD_VALUES = {options.positive_int: "3", options.non_negative_int: "0", options.seed: "0",
               options.image_size: "96", options.positive_float: "1e-3", options.non_negative_float: "0",
               options.probability: "1", options.open_fraction: "0.5", options.below_one: "0",
               options.size_schedule: "96:160", options.share: "1", options.finite_float: "-25"}


def benchmark_parser():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "benchmarks" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_args_parser()


PARSERS = {"train.py": train.get_args_parser, "predict.py": predict.get_args_parser,
           "export.py": export.get_args_parser, "split_data.py": split_data.get_args_parser,
           "benchmark.py": benchmark_parser}
POSITIONAL = {"predict.py": ["x.jpg"], "benchmark.py": ["data"]}


def numeric_actions(parser):
    return [a for a in parser._actions if a.option_strings and a.type is not None]


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_numeric_option_has_a_checked_type(script):
    actions = numeric_actions(PARSERS[script]())
    assert actions, script
    for action in actions:
        assert action.type in BAD_VALUES, f"{script} {action.option_strings[0]} is parsed with {action.type}"


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_bad_numbers_are_argparse_errors_naming_the_option(script, capsys):
    parser = PARSERS[script]()
    for action in numeric_actions(parser):
        option = action.option_strings[-1]
        assert action.type(GOOD_VALUES[action.type]) is not None
        for bad in BAD_VALUES[action.type]:
            with pytest.raises(SystemExit) as stop:
                parser.parse_args(POSITIONAL.get(script, []) + [option, bad])
            assert stop.value.code == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith(f"{parser.prog}: error: argument {option}"), err


def test_the_messages_say_the_rule():
    with pytest.raises(argparse.ArgumentTypeError, match="must be above 0, got -1"):
        options.positive_float("-1")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer, got '2.5'"):
        options.positive_int("2.5")
    assert options.probability("0.25") == 0.25 and options.positive_int("7") == 7
    assert options.size_schedule("128") == (128, 128) and options.size_schedule("96:160") == (96, 160)
    with pytest.raises(argparse.ArgumentTypeError, match="32"):
        options.size_schedule("100:160")  # the crop grows in steps of 32


@pytest.mark.parametrize("module,argv,prog", [
    (train, ["--lr", "-1"], "train.py"),
    (train, ["--val-resize", "100", "--val-crop", "200"], "train.py"),
    (predict, ["x.jpg", "--batch-size", "0"], "predict.py"),
    (split_data, ["--val-ratio", "1.5"], "python -m data_set.split_data"),
    (export, ["--check-images", "0"], "export.py"),
], ids=["train-lr", "train-val-crop", "predict", "split_data", "export"])
def test_a_commands_bad_option_is_one_line_and_exit_2(module, argv, prog, capsys, monkeypatch):
    """What `python train.py --lr -1` does (its run() with the command line's arguments): argparse's
    error line, named as the command is typed, exit status 2, before anything is loaded."""
    monkeypatch.setattr(sys, "argv", [prog.split()[-1]])  # argparse names the program after argv[0]
    with pytest.raises(SystemExit) as stop:
        module.run(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"{prog}: error: ")
