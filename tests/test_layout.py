"""The layout's rules: the commands and model.py at the top, support code in four folders, imports
running one way (commands -> data_set -> training -> inference -> plumbing -> model.py) with no cycle."""
import ast

import pytest

from helpers import REPO

pytestmark = pytest.mark.quick

# how far down a module stands: it may import only from modules further down (or its own folder's)
LEVEL = {"data_set": 4, "training": 3, "inference": 2, "plumbing": 1}
COMMAND, MODEL = 5, 0
FOLDERS = tuple(LEVEL)


def project_modules():
    """{dotted name: path} of every module of the project that is not a test or a benchmark."""
    modules = {p.stem: p for p in REPO.glob("*.py")}
    for folder in FOLDERS:
        modules.update({f"{folder}.{p.stem}": p for p in (REPO / folder).glob("*.py") if p.stem != "__init__"})
    return modules


def level(name):
    if name == "model":
        return MODEL
    return LEVEL.get(name.split(".")[0], COMMAND)


def imports_of(path, modules):
    """The project modules path imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def test_the_top_level_holds_the_commands_and_the_model():
    assert sorted(p.name for p in REPO.glob("*.py")) == ["app.py", "export.py", "model.py", "predict.py",
                                                           "report.py", "train.py"]


def test_imports_run_one_way():
    modules = project_modules()
    wrong = []
    for name, path in modules.items():
        for target in imports_of(path, modules):
            same_folder = "." in name and target.split(".")[0] == name.split(".")[0]
            if not same_folder and level(target) >= level(name):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong
    assert imports_of(modules["model"], modules) == set()


def test_no_import_cycle_among_modules_or_folders():
    modules = project_modules()
    graph = {name: imports_of(path, modules) for name, path in modules.items()}
    folder_of = {name: name.split(".")[0] if "." in name else name for name in modules}
    folder_graph = {}
    for name, targets in graph.items():
        folder_graph.setdefault(folder_of[name], set()).update(folder_of[t] for t in targets
                                                               if folder_of[t] != folder_of[name])
    for g in (graph, folder_graph):
        state = {}

        def visit(node, path, g=g, state=state):
            state[node] = "open"
            for nxt in g.get(node, ()):
                assert state.get(nxt) != "open", "import cycle: " + " -> ".join(path + [nxt])
                if nxt not in state:
                    visit(nxt, path + [nxt])
            state[node] = "done"

        for node in g:
            if node not in state:
                visit(node, [node])


def test_train_one_epoch_reads_in_one_screen():
    """The lesson's step in one screen (issue 36): train.py's train_one_epoch is at most 35 lines, its
    blocks nest at most two deep, it names what it uses from at most four modules, and the learner
    sees the forward pass, the paper's three losses with the aux weight, backward and the step."""
    source = (REPO / "train.py").read_text()
    tree = ast.parse(source)
    (function,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_one_epoch"]
    assert function.end_lineno - function.lineno + 1 <= 35

    def depth(node):
        blocks = (ast.For, ast.While, ast.If, ast.With, ast.Try)
        inner = [depth(child) for child in ast.iter_child_nodes(node)]
        return (isinstance(node, blocks)) + max(inner, default=0)

    assert max(depth(statement) for statement in function.body) <= 2
    imported = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported.update({(a.asname or a.name).split(".")[0]: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom):
            imported.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    used = {imported[n.id] for n in ast.walk(function) if isinstance(n, ast.Name) and n.id in imported}
    assert len(used) <= 4, used
    text = ast.get_source_segment(source, function)
    paper_loss = "criterion(logits, y) + args.aux_weight * (criterion(aux1, y) + criterion(aux2, y))"
    for line in ("outputs = model(", paper_loss, ".backward()", "scaler.step(optimizer)"):
        assert line in text, line


def test_only_the_weights_format_table_looks_at_a_weights_files_name():
    """inference/classify.py's weights_format is the one place that tells .pth from .onnx weights
    (export.py checks the name of the file it writes, not of weights it opens)."""
    found = []
    for path in [*REPO.glob("*.py"), *(p for f in FOLDERS for p in (REPO / f).glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "endswith"
                    and ".onnx" in ast.dump(node)):
                found.append(path.relative_to(REPO).as_posix())
    assert sorted(found) == ["export.py", "inference/classify.py"], found
