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
           "benchmarks/label_noise.py", "benchmarks/trust.py",
           "benchmarks/non_flowers.py")


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
def test_train_pys_option_groups_are_the_sections_of_docs_options():
    """train.py --help shows its options in the groups docs/options.md has them in, in the same order."""
    text = (REPO / "docs" / "options.md").read_text()
    section = text[text.index("## `train.py`"):]
    section = section[:section.index("\n## ")]
    documented = {}
    for title, body in re.findall(r"^### ([^\n]+)\n(.*?)(?=^### |\Z)", section, re.M | re.S):
        rows = [line.split("|")[1] for line in body.splitlines() if line.startswith("| `--")]
        if rows:
            documented[title] = {o for row in rows for o in re.findall(r"--[\w-]+", row)}
    groups = {g.title: {o for a in g._group_actions for o in a.option_strings}
              for g in train.get_args_parser()._action_groups if g._group_actions and g.title != "options"}
    assert list(groups) == list(documented)
    assert groups == documented


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


def project_files():
    """Every .py file of the project: the commands, the support folders and the benchmarks."""
    folders = ("training", "inference", "plumbing", "data_set", "benchmarks")
    return sorted(REPO.glob("*.py")) + [p for f in folders for p in sorted((REPO / f).glob("*.py"))]


# each command has these; the benchmarks' scripts too
EVERY_COMMANDS_OWN = {"main", "run", "get_args_parser"}
# names still defined in two modules, each to be given a name of its own (#36): this list only shrinks
NOT_YET_RENAMED = set()


@pytest.mark.quick
def test_no_class_or_function_name_is_defined_in_two_modules():
    import ast

    where = {}
    for path in project_files():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                where.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    twice = {name: paths for name, paths in where.items() if len(paths) > 1 and name not in EVERY_COMMANDS_OWN}
    assert sorted(twice) == sorted(NOT_YET_RENAMED), twice


def named_in_docs():
    """(where, name) of every module path (x/y.py) and `python -m a.b` module named in README.md,
    docs/*.md and the project's module docstrings."""
    for where, text in doc_texts():
        for path in re.findall(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.py)\b", text):
            yield where, path
        for module in re.findall(r"python -m ([\w.]+)", text):
            if module not in ("pytest", "pip", "venv", "torch.distributed.run", "onnxruntime", "tensorboard"):
                yield where, module.replace(".", "/") + ".py"


def doc_texts():
    """(where, text) of README.md, docs/*.md and every project module's docstring."""
    import ast

    texts = [(p.name, p.read_text()) for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]]
    return texts + [(str(p.relative_to(REPO)), ast.get_docstring(ast.parse(p.read_text())) or "")
                    for p in project_files()]


@pytest.mark.quick
def test_every_module_path_and_command_named_in_the_docs_exists():
    names = {p.name for p in project_files()} | {p.name for p in (REPO / "tests").glob("*.py")}
    missing = sorted({(where, path) for where, path in named_in_docs()
                      if not (REPO / path).exists() and not (REPO / "tests" / path).exists()
                      and not (REPO / "benchmarks" / path).exists()
                      and not ("/" not in path and path in names)})  # design.md names files inside their folder
    assert not missing, missing


@pytest.mark.quick
def test_every_script_option_named_in_the_docs_is_the_scripts():
    scripts = {script.rsplit("/", 1)[-1]: script for script in SCRIPTS}
    wrong = []
    for where, text in doc_texts():
        for name, option in re.findall(r"\b([\w/]+\.py) (--[\w-]+)", text):
            script = scripts.get(name.rsplit("/", 1)[-1])
            # time_to_accuracy.py hands every option not its own to train.py
            also = train.get_args_parser()._option_string_actions if name.endswith("time_to_accuracy.py") else {}
            if script and option not in {**parser_of(script)._option_string_actions, **also}:
                wrong.append(f"{where}: {name} {option}")
    assert not wrong, wrong


@pytest.mark.quick
def test_every_user_error_is_in_the_table_of_plumbing_options():
    import ast

    from plumbing.options import UserError

    table = {line.split()[0]: line.split()[1:3] for line in UserError.__doc__.splitlines()
             if re.match(r"\s+[A-Z]\w+\s+\S+\.py\s+\d", line)}
    found = {}
    for path in project_files():
        for node in ast.parse(path.read_text()).body:
            bases = [getattr(b, "id", getattr(b, "attr", "")) for b in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and "UserError" in bases:
                codes = [s.value.value for s in node.body if isinstance(s, ast.Assign)
                         and [t.id for t in s.targets if isinstance(t, ast.Name)] == ["exit_code"]]
                found[node.name] = [str(path.relative_to(REPO)), str(codes[0] if codes else UserError.exit_code)]
    assert table == found
