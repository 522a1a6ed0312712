"""Which training of the "not sure" answer to keep: each candidate trained on the same split and seed
as today's default, and scored side by side (issue 35).

    python benchmarks/trust.py --data-path ../shared/flower_photos --unknowns NON_FLOWERS --held-out tulips
    python benchmarks/trust.py ... --candidates default logitnorm pixmix --seeds 0 1
    python benchmarks/trust.py ... --add mine "--pixmix 2 --pixmix-beta 4"   # another candidate
    python benchmarks/trust.py ... --dry-run                                 # the commands, nothing run

Every argument that is not this script's goes to train.py unchanged, for every run (--epochs 10,
--device cuda, ...); the split is train.py's (--split-seed), the same for all. For each candidate and
seed it trains with the candidate's options and --seed S, then scores the run's best.pth with
train.py --eval-only --unknowns, and reports:

    val accuracy     best.pth's, on the run's val photos
    minutes          train.py's own clock over the run's sessions (last.pth's plan), start-up excluded
    ECE (T)          ECE after the run's temperature, 15 equal-width bins, on --test-path (labelled photos
                     the runs never saw, in class folders) or else on the val photos the temperature was
                     fitted on (in-sample: too low, and the table says so)
    far AUROC        of the run's "not sure" score (--not-sure-score), the test photos against --unknowns
    caught at 90%    the share of --unknowns answered "unknown" when 90% of the test photos are answered
    near AUROC       with --held-out CLASS: a second run on the other classes, scored with CLASS's photos
                     as the unknowns
    test accuracy    on --test-path (or the val photos again)

Runs go into --work/<candidate>-seed<S>[-near]/. A run whose result.json is there is skipped; one
stopped part-way goes on from its last.pth (train.py --resume): stop this script at any time and
start it again with the same command. The table is printed in markdown and written to
--work/table.md.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from benchmark import cpu_description  # noqa: E402
from plumbing.options import UserError, run_command  # noqa: E402

TRAIN = os.path.join(ROOT, "train.py")
# Each candidate's options beside today's default (train.py's defaults: the energy score decides "not
# sure" since this table chose it; max-probability is the default recipe scored as before). The
# settings are the papers' (LogitNorm's tau 0.04, PixMix's k 4 and beta 3), but for the energy margins:
# train.py's -7 -2, and the paper's -25 -7 (for fine-tuning) as energy-oe-paper.
CANDIDATES = {
    "default": "",
    "max-probability": "--not-sure-score max_probability",
    "outliers": "--outliers 16",
    "logitnorm": "--logit-norm 0.04",
    "pixmix": "--pixmix 4",
    "rotation": "--rotation-weight 0.5 --not-sure-score rotation",
    "energy-oe": "--outliers 16 --outlier-loss energy",
    "energy-oe-paper": "--outliers 16 --outlier-loss energy --energy-margins -25 -7",
    "rotation+pixmix": "--rotation-weight 0.5 --pixmix 4 --not-sure-score rotation",
    "logitnorm+pixmix": "--logit-norm 0.04 --pixmix 4",
    "pixmix+energy-oe": "--pixmix 4 --outliers 16 --outlier-loss energy",
}
OWN = ("--data-path", "--output-dir", "--seed", "--resume", "--eval-only", "--unknowns", "--weights", "--overwrite")


def get_args_parser():
    # allow_abbrev=False: train.py's --seed must not be read as this script's --seeds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data-path", required=True, help="the flower photos: class folders, as train.py takes them")
    p.add_argument("--unknowns", required=True, metavar="FOLDER",
                   help="photos of none of the classes, never used in training (the far unknowns)")
    p.add_argument("--held-out", default=None, metavar="CLASS",
                   help="a class of --data-path left out of a second run of each candidate, whose photos are then "
                        "its unknowns (near AUROC; default: no near runs)")
    p.add_argument("--test-path", default=None,
                   help="labelled photos in class folders that no run trains on, for the ECE and the test accuracy "
                        "(default: each run's val photos)")
    p.add_argument("--work", default=os.path.join("runs", "trust"), help="where the runs and table.md go")
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), metavar="NAME",
                   help=f"the candidates to run, of: {', '.join(CANDIDATES)} (default: all) and those of --add")
    p.add_argument("--add", nargs=2, action="append", default=[], metavar=("NAME", "OPTIONS"),
                   help="another candidate: its name and its train.py options in one quoted string (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.py --seed of each run")
    p.add_argument("--dry-run", action="store_true", help="print what would run (and what is done) and stop")
    return p


def plan(opts, train_args):
    """[(run name, candidate, seed, near)] in the order they run; refuses unknown names and our own options."""
    candidates = dict(CANDIDATES, **dict(opts.add))
    unknown = [c for c in opts.candidates + [name for name, _ in opts.add] if c not in candidates]
    if unknown:
        raise UserError(f"no candidate {unknown[0]}: pass names of {', '.join(candidates)}, or add one with "
                        "--add NAME \"OPTIONS\"")
    taken = [a for a in train_args if a.split("=")[0] in OWN]
    if taken:
        raise UserError(f"{taken[0]} is this script's to set for each run: leave it out")
    names = list(dict.fromkeys(opts.candidates + [name for name, _ in opts.add]))
    runs = []
    for seed in opts.seeds:
        for name in names:
            runs.append((f"{name}-seed{seed}", name, seed, False))
            if opts.held_out:
                runs.append((f"{name}-seed{seed}-near", name, seed, True))
    return candidates, runs


def near_data(data_path, held_out, folder, dry_run=False):
    """folder/<class>/ (or folder/{train,val}/<class>/) linking every class of data_path but held_out
    (made unless dry_run); (the folder, the held-out class's folders)."""
    split = os.path.isdir(os.path.join(data_path, "train"))
    parts = ("train", "val") if split else ("",)
    held = []
    for part in parts:
        source = os.path.join(data_path, part)
        classes = sorted(e.name for e in os.scandir(source) if e.is_dir() and not e.name.startswith("."))
        if held_out not in classes:
            raise UserError(f"--held-out {held_out}: {source} has no such class folder (it has "
                            f"{', '.join(classes)})")
        held.append(os.path.join(source, held_out))
        if dry_run:
            continue
        os.makedirs(os.path.join(folder, part), exist_ok=True)
        for name in classes:
            link = os.path.join(folder, part, name)
            if name != held_out and not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(source, name)), link)
    return folder, held


def run_train(cmd, log_path, dry_run):
    """Run one train.py command, its output into log_path; the exit code (0 for a dry run)."""
    print("  $ " + " ".join(shlex.quote(c) for c in ["python", *cmd[1:]]), flush=True)
    if dry_run:
        return 0
    with open(log_path, "a") as log:
        return subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode


def last_error(log_path):
    with open(log_path) as f:
        lines = [line.strip() for line in f if line.strip().startswith("error:")]
    return lines[-1] if lines else f"see {log_path}"


def one_run(opts, train_args, options, name, seed, near, dry_run):
    """Train (or continue) and score one run; its result dict (None for a dry run)."""
    folder = os.path.join(opts.work, name)
    result_path = os.path.join(folder, "result.json")
    if os.path.isfile(result_path):
        print(f"{name}: done already ({result_path})", flush=True)
        with open(result_path) as f:
            return json.load(f)
    print(f"{name}:", flush=True)
    data, unknowns = opts.data_path, [opts.unknowns]
    if near:
        data, unknowns = near_data(opts.data_path, opts.held_out, os.path.join(opts.work, "near-data"), dry_run)
    if not dry_run:
        os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "train.log")
    last = os.path.join(folder, "last.pth")
    trained = os.path.join(folder, "trained")  # written once train.py ended well: nothing left to train
    if not os.path.isfile(trained):
        cmd = ([sys.executable, TRAIN, "--resume", last] if os.path.isfile(last) else
               [sys.executable, TRAIN, "--data-path", data, "--output-dir", folder, "--class-indices",
                os.path.join(folder, "class_indices.json"), "--seed", str(seed), *shlex.split(options), *train_args])
        if run_train(cmd, log_path, dry_run):
            raise UserError(f"{name}: train.py failed: {last_error(log_path)}")
        if not dry_run:
            open(trained, "w").close()
    scores = {}
    for i, folder_of_unknowns in enumerate(unknowns):  # near: the held-out class's train and val halves
        test = opts.test_path or data
        if near and opts.test_path:  # the test photos of the held-out class are its unknowns, not known ones
            test = data
        # fp32, as the temperature was fitted; the other options as the runs had them (--device, ...)
        cmd = [sys.executable, TRAIN, "--eval-only", "--weights", os.path.join(folder, "best.pth"), "--data-path",
               test, "--unknowns", folder_of_unknowns, "--output-dir", os.path.join(folder, f"eval{i}"),
               *without(train_args, "--amp"), "--amp", "off"]
        print("  $ " + " ".join(shlex.quote(c) for c in ["python", *cmd[1:]]), flush=True)
        if dry_run:
            continue
        scores[folder_of_unknowns] = run_eval_only(cmd, name)
    if dry_run:
        return None
    result = summarize_run(folder, scores, near, bool(opts.test_path))
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def without(args, option):
    """args less option and its value (given as `--option value` or `--option=value`)."""
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            kept.append(a)
    return kept


def run_eval_only(cmd, name):
    """The figures train.py --eval-only --unknowns prints (see parse_evaluation)."""
    with tempfile.TemporaryFile("w+") as err:
        out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        err.seek(0)
        error = [line for line in err.read().splitlines() if line.startswith("error:")]
    if out.returncode:
        raise UserError(f"{name}: train.py --eval-only failed: {error[-1] if error else out.returncode}")
    return parse_evaluation(out.stdout)


def parse_evaluation(text):
    """{accuracy, images, ece, auroc, caught_at_90, aurocs {score: AUROC}} of train.py --eval-only
    --unknowns' report (training/metrics.py's lines)."""
    accuracy = re.search(r"^accuracy: ([\d.]+) \((\d+)/(\d+)\)", text, re.M)
    ece = re.search(r"^calibration: .*?ECE ([\d.]+)(?: -> ([\d.]+))?", text, re.M)
    auroc = re.search(r"^unknowns: (\d+) images .*?AUROC ([\d.]+|nan) of the", text, re.M)
    caught = re.search(r"at 90% of the known answered \(\S+\): ([\d.]+)% of the unknowns caught", text)
    each = re.search(r"AUROC of each score: (.*)$", text, re.M)
    if not (accuracy and ece and auroc and each):
        raise UserError("train.py --eval-only printed no report this script can read: is it this "
                        "repository's train.py?")
    return {"accuracy": float(accuracy.group(1)), "images": int(accuracy.group(3)),
            "ece": float(ece.group(2) or ece.group(1)), "unknowns": int(auroc.group(1)),
            "auroc": float(auroc.group(2)), "caught_at_90": float(caught.group(1)) / 100 if caught else None,
            "aurocs": {s: float(v) for s, v in (pair.rsplit(" ", 1) for pair in each.group(1).split(", "))}}


def summarize_run(folder, scores, near, held_out_test):
    """What the table shows of one run: best.pth's val accuracy, the minutes, and its scores (for a near
    run, the AUROC over the held-out class's photos in every folder, weighted by their numbers)."""
    from inference import checkpoint as ckpt

    best = ckpt.load_checkpoint(os.path.join(folder, "best.pth"))
    last = ckpt.load_checkpoint(os.path.join(folder, "last.pth"))
    result = {"val_accuracy": best.get("val_accuracy"), "minutes": last["plan"]["elapsed_s"] / 60,
              "score": best.get("not_sure_score", "max_probability"), "epochs": last["epoch"]}
    parts = list(scores.values())
    if near:
        total = sum(p["unknowns"] for p in parts)
        result["near_auroc"] = sum(p["auroc"] * p["unknowns"] for p in parts) / total
    else:
        (part,) = parts
        result.update(test_accuracy=part["accuracy"], test_images=part["images"], ece=part["ece"],
                      far_auroc=part["auroc"], caught_at_90=part["caught_at_90"], aurocs=part["aurocs"],
                      ece_held_out=held_out_test)
    return result


def table(candidates, runs, results):
    """The markdown table: one row per candidate and seed, its near run's AUROC beside the far figures."""
    rows = ["| candidate | seed | options | val accuracy | minutes | x default | ECE (T) | far AUROC | "
            "caught at 90% answered | near AUROC | score | test accuracy |", "| " + " | ".join(["---"] * 12) + " |"]
    far = {(c, s): results.get(n) for n, c, s, near in runs if not near}
    near = {(c, s): results.get(n) for n, c, s, near in runs if near}

    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    for (name, seed), r in far.items():
        if r is None:
            continue
        base = far.get(("default", seed))
        ratio = f"{r['minutes'] / base['minutes']:.2f}" if base and base["minutes"] else "-"
        n = near.get((name, seed))
        ece = number(r["ece"]) + ("" if r["ece_held_out"] else " (val, in-sample)")
        caught = "-" if r["caught_at_90"] is None else f"{100 * r['caught_at_90']:.1f}%"
        rows.append(f"| {name} | {seed} | `{candidates[name] or '(defaults)'}` | {number(r['val_accuracy'])} | "
                    f"{r['minutes']:.1f} | {ratio} | {ece} | {number(r['far_auroc'])} | {caught} | "
                    f"{number(n and n['near_auroc'])} | {r['score']} | {number(r['test_accuracy'])} |")
    return "\n".join(rows)


def main(argv=None):
    opts, train_args = get_args_parser().parse_known_args(argv)
    for key in ("data_path", "unknowns", "test_path", "work"):  # train.py runs from the repository's folder
        if getattr(opts, key):
            setattr(opts, key, os.path.abspath(getattr(opts, key)))
    candidates, runs = plan(opts, train_args)
    for folder, what in ((opts.data_path, "--data-path"), (opts.unknowns, "--unknowns"),
                         (opts.test_path, "--test-path")):
        if folder and not os.path.isdir(folder):
            raise UserError(f"{what} {folder} is not a folder")
    print(f"{cpu_description()}\n{len(runs)} runs into {opts.work}; train.py options for all: "
          f"{' '.join(train_args) or '(none)'}", flush=True)
    started, results = time.perf_counter(), {}
    for name, candidate, seed, near in runs:
        result = one_run(opts, train_args, candidates[candidate], name, seed, near, opts.dry_run)
        if result is not None:
            results[name] = result
    if opts.dry_run:
        return 0
    text = table(candidates, runs, results)
    print("\n" + text)
    with open(os.path.join(opts.work, "table.md"), "w") as f:
        f.write(text + "\n")
    print(f"\n{(time.perf_counter() - started) / 60:.1f} min; written to {os.path.join(opts.work, 'table.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, None))
