"""README and the docs stay true to the scripts: every option a script takes is documented, and the
seed's recipe line in README selects the seed's recipe."""
import re
import shlex

import pytest

import train
from helpers import REPO, SPLIT_DATA, run_script, script_env

DOCUMENTED_IN = {
    "train.py": "README.md",
    "predict.py": "README.md",
    "export.py": "README.md",
    "report.py": "README.md",
    "model.py": "README.md",
    "data_set/split_data.py": "data_set/README.md",
    "benchmarks/benchmark.py": "docs/performance.md",
    "benchmarks/time_to_accuracy.py": "docs/performance.md",
}


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


def test_readme_seed_command_selects_the_seed_recipe():
    readme = (REPO / "README.md").read_text()
    (line,) = [l for l in readme.splitlines() if l.startswith("python train.py --epochs 30 --variant paper")]
    args = train.get_args_parser().parse_args(shlex.split(line)[2:])
    seed = dict(epochs=30, variant="paper", image_size=(224, 224), val_crop=224, opt="adam", lr=3e-4, weight_decay=0.0,
                lr_scheduler="none", warmup_epochs=0, label_smoothing=0.0, auto_augment="none", random_erase=0.0,
                mixup_alpha=0.0, cutmix_alpha=0.0, model_ema=False, batch_size=32, aux_weight=0.3)
    assert {k: getattr(args, k) for k in seed} == seed
