"""Files that must survive a crash: atomic writes, the one checkpoint format, and loading weights.

A checkpoint is a dict with the weights under "model" and what predict.py needs to use them
("classes", "variant", "image_size", "mean", "std"), plus the run's "args" and, in last.pth, the
state to resume ("optimizer", "scheduler", "scaler", "epoch", "step", "best_acc", "rng", ...).
A plain state dict (the classic ``googleNet.pth``) loads too; its classes come from class_indices.json.
"""
import json
import os
import tempfile

import torch

from model import HEAD_PREFIXES

AUX_PREFIXES = ("aux1.", "aux2.")


class CheckpointError(Exception):
    """A weights file that is missing, unreadable or for another model: the message says what to do."""


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SaveError(OSError):
    """A file that could not be written (a full disk, a read-only folder); str() is the one-line message.

    errno and strerror are those of the failed write, so callers can word their own message.
    """

    def __init__(self, path, error):
        super().__init__(error.errno, error.strerror or str(error))
        self.path = path

    def __str__(self):
        return f"cannot write {self.path} ({self.strerror}): free some disk space, or write it somewhere else"


def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, fsync it, then rename it over path.

    A crash at any moment leaves either the old complete file or the new complete one; a failed
    write (a full disk, say) removes the temporary file, keeps the old file untouched and raises
    SaveError.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; users expect their umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
            e = e.__context__  # torch.save reports a failed write (a full disk) as a RuntimeError
        if isinstance(e, OSError) and not isinstance(e, SaveError):
            raise SaveError(path, e) from e
        raise
    _fsync_dir(folder)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temp_files(folder, names=("best.pth", "last.pth", "class_indices.json", "metrics.csv")):
    """Delete the temporary files of saves that a crash or SIGKILL cut short (never a real file)."""
    for entry in os.listdir(folder):
        if entry.endswith(".tmp") and any(entry.startswith(f".{n}.") for n in names):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def write_class_indices(path, classes):
    atomic_write_text(path, json.dumps({str(i): c for i, c in enumerate(classes)}, indent=4) + "\n")


def read_class_indices(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return [data[str(i)] for i in range(len(data))]
    except FileNotFoundError:
        raise CheckpointError(f"class index file {path} does not exist: pass --class-indices, or use a "
                              "checkpoint written by train.py, which holds its class names")
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a class index file like {{\"0\": \"daisy\", ...}}")


def load_checkpoint(path, option="--weights"):
    """The checkpoint dict; a plain state dict comes back as {"model": state_dict}."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file {path} does not exist: train first (python train.py) "
                              f"or pass {option} with the right path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CheckpointError(f"{path} is not a readable PyTorch weights file (damaged, or another format): "
                              "pass a best.pth or last.pth written by train.py, or a saved state dict")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise CheckpointError(f"{path} holds neither a checkpoint nor a state dict")


def clean_state_dict(state_dict):
    """Strip the 'module.' prefix that DataParallel/DDP wrappers add, if every key has it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def guess_variant(state_dict):
    return "torchvision" if any(".bn." in k for k in state_dict) else "paper"


def load_weights(model, state_dict, path, reinit_heads=False):
    """Load state_dict into model, allowing exactly the differences that are expected.

    - aux1.*/aux2.* keys are dropped when the model has no aux heads (prediction);
    - with reinit_heads, class-count-dependent head layers whose shapes differ keep their fresh
      initialisation (fine-tuning on new classes); their names are returned.
    Any other missing, unexpected or misshaped key is an error that names the keys.
    """
    state_dict = clean_state_dict(state_dict)
    own = model.state_dict()
    if not getattr(model, "aux_logits", True):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(AUX_PREFIXES)}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        def names(keys):
            return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {names(unexpected)}")
        raise CheckpointError(f"{path} does not fit this GoogLeNet ({model.variant} variant): "
                              f"{'; '.join(parts)}. Use weights trained with this repository's model.py")
    misshaped = sorted(k for k in own if own[k].shape != state_dict[k].shape)
    reinit = [k for k in misshaped if reinit_heads and k.startswith(HEAD_PREFIXES)]
    wrong = [k for k in misshaped if k not in reinit]
    if wrong:
        details = ", ".join(f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:6])
        details += f" and {len(wrong) - 6} more" if len(wrong) > 6 else ""  # the 6 heads all show
        hint = ""
        if any(k.startswith(HEAD_PREFIXES) for k in wrong):
            hint = (f" The weights are for {state_dict['fc.weight'].shape[0]} classes and the model has "
                    f"{own['fc.weight'].shape[0]}: use the class index file that came with them.")
        raise CheckpointError(f"{path} does not fit this model: {details}.{hint}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in reinit}, strict=not reinit)
    return sorted({k.rsplit(".", 1)[0] for k in reinit})


def capture_rng_state():
    import random

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    import random

    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
