"""README and the docs stay true to the scripts: every option a script takes is documented, every
command README shows parses, and the classic recipe's line selects the classic recipe."""
import re
import shlex

import pytest

import train
from helpers import REPO, SPLIT_DATA, run_script, script_env

DOCUMENTED_IN = {script: "docs/options.md" for script in (
    "train.py", "predict.py", "export.py", "report.py", "model.py", "app.py", "data_set/split_data.py",
    "benchmarks/benchmark.py", "benchmarks/time_to_accuracy.py", "benchmarks/formats.py", "benchmarks/startup.py")}


@pytest.mark.parametrize("script", sorted(DOCUMENTED_IN))
def test_every_option_is_documented(script):
    proc = run_script(SPLIT_DATA if script == "data_set/split_data.py" else REPO / script, ["--help"],
                      env=dict(script_env(), COLUMNS="1000"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", proc.stdout)) - {"--help"}
    assert options, proc.stdout
    text = (REPO / DOCUMENTED_IN[script]).read_text()
    missing = sorted(o for o in options if not re.search(re.escape(o) + r"(?![\w-])", text))
    assert not missing, f"{script} options missing from {DOCUMENTED_IN[script]}: {missing}"


def test_readme_classic_recipe_line_selects_the_classic_recipe():
    readme = (REPO / "README.md").read_text()
    (line,) = [l for l in readme.splitlines() if l.startswith("python train.py --epochs 30 --variant paper")]
    args = train.get_args_parser().parse_args(shlex.split(line)[2:])
    seed = dict(epochs=30, variant="paper", image_size=(224, 224), val_crop=224, opt="adam", lr=3e-4, weight_decay=0.0,
                lr_scheduler="none", warmup_epochs=0, label_smoothing=0.0, auto_augment="none", random_erase=0.0,
                mixup_alpha=0.0, cutmix_alpha=0.0, model_ema=False, batch_size=32, aux_weight=0.3)
    assert {k: getattr(args, k) for k in seed} == seed


def test_every_command_in_readme_parses_and_no_path_is_this_machines():
    import app
    import export
    import predict

    parsers = {"train.py": train.get_args_parser, "predict.py": predict.get_args_parser,
               "export.py": export.get_args_parser, "app.py": app.get_args_parser}
    readme = (REPO / "README.md").read_text()
    assert "../shared" not in readme and "/work/" not in readme
    commands = [shlex.split(l.split("#")[0].split("&&")[0]) for l in readme.splitlines() if l.startswith("python ")]
    checked = 0
    for words in commands:
        if words[1] in parsers:
            parsers[words[1]]().parse_args(words[2:])  # argparse exits on anything it does not take
            checked += 1
    assert checked >= 15, checked
