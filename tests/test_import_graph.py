"""The package's stages import one way. Every module of objloader is parsed (imports inside
functions included) and each import of another objloader module is checked against the layers
below: a module may import its own layer and the layers before it, never a later one.

    neutral    errors, optional, checkpoint (trainer checkpoints: the encoders they hold, how to
               read them), fileio (hashing, atomic writes), ranges (the allowed range of every
               numeric setting), procs (worker lifetimes, failure lines), runtime (ranks, device,
               process group, worker counts)
    ops        augment (the semantics of every augmentation), kernels (their fast implementations):
               a leaf library the data-flow stages call
    sources -> cam -> store -> loaders -> ssl -> cli

ContraCAM (cam) reads its checkpoint through the neutral module, not through ssl; the builder
(store) takes ContraCAM's masks through a provider it is handed, so cam never imports store.

Inside a layer too, no two modules import each other, directly or round a longer loop (imports
inside functions count: a lazy import only hides a cycle until a change moves it to the top).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIRS = {"objloader": os.path.join(REPO, "objloader"), "objloader.kernels": os.path.join(REPO, "kernels")}
LAYERS = [
    {"errors", "optional", "checkpoint", "fileio", "ranges", "procs", "runtime"},
    {"augment", "kernels"},
    {"sources"},
    {"cam"},
    {"store"},
    {"loaders"},
    {"ssl"},
    {"cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules():
    for package, root in PACKAGE_DIRS.items():
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].replace(os.sep, ".")
                    name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                    yield name, os.path.join(dirpath, f)


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "objloader"


def _imports(name: str, path: str):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("objloader"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("objloader"):
                # "from objloader import x" names submodules: check each
                yield from ([f"{target}.{a.name}" for a in node.names] if target == "objloader" else [target])


def test_no_import_goes_to_a_later_stage():
    bad = []
    for name, path in _modules():
        src = _stage(name)
        if src == "objloader":  # the package's own __init__ (lazy re-export of make_loader)
            continue
        for target in _imports(name, path):
            dst = _stage(target)
            if dst in RANK and RANK[dst] > RANK[src]:
                bad.append(f"{name} -> {target}")
    assert not bad, "imports of a later stage:\n" + "\n".join(sorted(set(bad)))


def _module_graph() -> dict:
    """module -> the objloader modules it imports; ``from PKG import name`` of a name that is not
    a module (a function, a class) counts as an import of PKG."""
    modules = dict(_modules())
    graph = {}
    for name, path in modules.items():
        deps = set()
        for target in _imports(name, path):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def _reachable(graph: dict, start: str) -> dict:
    """module -> the module it was first reached from, for every module ``start`` imports, directly or not."""
    came_from, todo = {}, [start]
    while todo:
        node = todo.pop()
        for dep in sorted(graph[node]):
            if dep not in came_from:
                came_from[dep] = node
                todo.append(dep)
    return came_from


def import_cycles(graph: dict) -> list:
    """One loop "a -> b -> ... -> a" for each group of modules that import each other."""
    reach = {name: _reachable(graph, name) for name in graph}
    seen, cycles = set(), []
    for name in sorted(graph):
        if name in seen or name not in reach[name]:
            continue
        group = {other for other in reach[name] if name in reach[other]}
        seen |= group
        path, node = [name], reach[name][name]  # walk back from name to itself
        while node != name:
            path.append(node)
            node = reach[name][node]
        cycles.append(" -> ".join([name] + path[:0:-1] + [name]))
    return cycles


def test_import_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == ["a -> b -> c -> a"]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_import_cycle():
    cycles = import_cycles(_module_graph())
    assert not cycles, "modules that import each other:\n" + "\n".join(cycles)


def test_every_stage_is_in_a_layer():
    stages = {_stage(name) for name, _ in _modules()} - {"objloader"}
    assert stages <= set(RANK), stages - set(RANK)


def test_import_objloader_is_light():
    code = "import sys, objloader; heavy = {'torch', 'numba', 'cv2', 'ffcv', 'nvidia.dali'} & set(sys.modules); print(sorted(heavy))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# What of store reads a built dataset: the records, the manifest and its check, the schema's names.
STORE_READING = {"objloader.store.reader", "objloader.store.integrity", "objloader.store.schema"}


def test_training_and_evaluation_make_no_data():
    """ssl reads built datasets (STORE_READING) but never generates or builds one: making the demo
    data for a training command is the command line's job (objloader/cli/train.py)."""
    bad = [f"{name} -> {target}" for name, path in _modules() if _stage(name) == "ssl"
           for target in _imports(name, path)
           if _stage(target) == "sources" or (_stage(target) == "store" and target not in STORE_READING)]
    assert not bad, "\n".join(bad)
