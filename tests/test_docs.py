"""README and the docs stay true to the scripts: every option a script takes is documented, every
command README shows parses, and the classic recipe's line selects the classic recipe."""
import argparse
import importlib
import re
import shlex
import sys

import pytest

import train
from helpers import REPO

SCRIPTS = ("train.py", "predict.py", "export.py", "report.py", "model.py", "app.py", "data_set/split_data.py",
           "data_set/check.py", "benchmarks/benchmark.py", "benchmarks/time_to_accuracy.py", "benchmarks/formats.py",
           "benchmarks/startup.py", "benchmarks/page_load.py", "benchmarks/relu_placement.py",
           "benchmarks/label_noise.py", "benchmarks/trust.py")


def parser_of(script):
    """The script's argparse parser, built in this process (each script has get_args_parser)."""
    name = script[:-3].replace("/", ".")
    if script.startswith("benchmarks/"):
        sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmarks import each other as their scripts do
        name = name.split(".")[1]
    return importlib.import_module(name).get_args_parser()


HEADINGS = {"data_set/split_data.py": "`python -m data_set.split_data`",
            "data_set/check.py": "`python -m data_set.check`",
            "report.py": "`report.py`, `model.py`", "model.py": "`report.py`, `model.py`"}


def section_of(script, documented):
    """The part of docs/options.md about script: from its heading to the next one."""
    heading = "Benchmarks" if script.startswith("benchmarks/") else HEADINGS.get(script, f"`{script}`")
    (section,) = [part for part in documented.split("\n## ") if part.startswith(heading)]
    return section


@pytest.mark.quick
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_is_documented_in_its_commands_section(script):
    parser = parser_of(script)
    options = {o for action in parser._actions if action.help != argparse.SUPPRESS
               for o in action.option_strings if o.startswith("--")} - {"--help"}
    assert options, script
    section = section_of(script, (REPO / "docs" / "options.md").read_text())
    missing = sorted(o for o in options if not re.search(re.escape(o) + r"(?![\w-])", section))
    assert not missing, f"{script} options missing from its section of docs/options.md: {missing}"


@pytest.mark.quick
def test_readme_classic_recipe_line_selects_the_classic_recipe():
    readme = (REPO / "README.md").read_text()
    (line,) = [line for line in readme.splitlines() if line.startswith("python train.py --epochs 30 --variant paper")]
    args = train.get_args_parser().parse_args(shlex.split(line)[2:])
    seed = dict(epochs=30, variant="paper", image_size=(224, 224), val_crop=224, opt="adam", lr=3e-4, weight_decay=0.0,
                lr_scheduler="none", warmup_epochs=0, label_smoothing=0.0, auto_augment="none", random_erase=0.0,
                mixup_alpha=0.0, cutmix_alpha=0.0, model_ema=False, batch_size=32, aux_weight=0.3)
    assert {k: getattr(args, k) for k in seed} == seed


@pytest.mark.quick
def test_every_command_in_readme_parses_and_no_path_is_this_machines():
    import app
    import export
    import predict
    import report

    parsers = {"train.py": train.get_args_parser, "predict.py": predict.get_args_parser,
               "export.py": export.get_args_parser, "app.py": app.get_args_parser, "report.py": report.get_args_parser}
    readme = (REPO / "README.md").read_text()
    assert "../shared" not in readme and "/work/" not in readme
    commands = [shlex.split(line.split("#")[0].split("&&")[0]) for line in readme.splitlines()
                if line.startswith("python ")]
    checked = 0
    for words in commands:
        if words[1] in parsers:
            parsers[words[1]]().parse_args(words[2:])  # argparse exits on anything it does not take
            checked += 1
    assert checked >= 15, checked
