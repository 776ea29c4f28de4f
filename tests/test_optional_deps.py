"""objloader as the core install (``pip install objloader``, no extra) has it: setup.py's core
requirements leave out ffcv, DALI and pydensecrf and each is an extra; in a process that can import
only the core requirements and what they pull in (every other installed distribution hidden, as in
a fresh venv with the core install), objloader imports, builds a wds dataset, runs the torch engine
(with workers), a trainer step and ContraCAM; asking for a feature whose library is missing names
the extra to install."""
import importlib.metadata
import os
import re
import runpy
import subprocess
import sys
import textwrap

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from objloader.optional import EXTRAS, MissingDependency, require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = {"numpy", "torch", "torchvision", "numba", "opencv-python", "scikit-image", "tqdm", "pillow", "matplotlib"}
# the distributions that provide each optional import name
PROVIDERS = {"ffcv": {"ffcv"}, "nvidia.dali": {"nvidia-dali-cuda130", "nvidia-dali-cuda120"},
             "pydensecrf": {"pydensecrf2"}}


def _setup_kwargs(monkeypatch) -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (its metadata, nothing built)."""
    import setuptools

    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(REPO)  # setup.py reads README.md beside it
    runpy.run_path(os.path.join(REPO, "setup.py"))
    return seen


def _names(requirements) -> set:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _installed_closure(requirements) -> set:
    """The installed distributions that ``requirements`` pull in, transitively (extras left out)."""
    todo, found = [Requirement(r) for r in requirements], set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here, so nothing of it can be imported anyway
        found.add(name)
        todo += [Requirement(r) for r in dist.requires or []]
    return found


def _not_in_core_install(core_requirements):
    """What a core install lacks: (top-level import names that only distributions outside it
    provide, plus the optional libraries themselves; those distributions). nvidia.dali shares the
    `nvidia` namespace with torch's CUDA wheels, so it is hidden by its full name."""
    allowed = _installed_closure(core_requirements) | {"pip", "setuptools", "wheel"}  # in any fresh venv
    dists = {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()} - allowed
    modules = {top for top, names in importlib.metadata.packages_distributions().items()
               if top != "objloader" and not any(canonicalize_name(d) in allowed for d in names)}
    return sorted(modules | set(EXTRAS)), sorted(dists - {"objloader"})


def test_core_requirements_leave_out_the_optional_libraries_and_each_is_an_extra(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    assert _names(kw["install_requires"]) == CORE
    extras = kw["extras_require"]
    for module, options in EXTRAS.items():  # every extra a MissingDependency names exists and provides it
        for extra, _ in options:
            assert extra in extras and _names(extras[extra]) <= PROVIDERS[module], (module, extra)
    assert _names(extras["dali"]) == {"nvidia-dali-cuda130"} and _names(extras["dali-cuda12"]) == {"nvidia-dali-cuda120"}
    assert _names(extras["all"]) == {"ffcv", "nvidia-dali-cuda130", "pydensecrf2"}
    assert "pytest-xdist" in _names(extras["test"])
    # `make test` / `make demo` install everything, at the versions of constraints.txt
    assert re.search(r"pip install .*-c constraints\.txt -e '\.\[all,test\]'", open(os.path.join(REPO, "Makefile")).read())
    pinned = {canonicalize_name(line.split("=")[0]) for line in open(os.path.join(REPO, "constraints.txt"))
              if line.strip() and not line.startswith("#")}
    missing = (_names(kw["install_requires"]) | _names(extras["all"]) | _names(extras["test"])) - pinned
    assert not missing, f"not pinned in constraints.txt: {missing}"

# Imported first in every Python process started with it on PYTHONPATH (torch engine workers
# from the forkserver included): every finder is wrapped so that what a core install lacks is not
# there, as if it were not installed: import raises ModuleNotFoundError, importlib.util.find_spec
# returns None and importlib.metadata does not list the distribution (torch asks it about optree).
_HIDE = '''
import re, sys
HIDDEN, HIDDEN_DISTS = %r, %r

def hidden(name):
    return any(name == h or name.startswith(h + ".") for h in HIDDEN)

def _hidden_dist(dist):
    return re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower() in HIDDEN_DISTS

class _Without:
    def __init__(self, finder):
        self._finder = finder
    def find_spec(self, name, path=None, target=None):
        if hidden(name) or not hasattr(self._finder, "find_spec"):
            return None
        return self._finder.find_spec(name, path, target)
    def find_distributions(self, *args, **kwargs):
        if not hasattr(self._finder, "find_distributions"):
            return iter(())
        return (d for d in self._finder.find_distributions(*args, **kwargs) if not _hidden_dist(d))
    def __getattr__(self, attr):  # invalidate_caches, ...
        return getattr(self._finder, attr)

sys.meta_path[:] = [_Without(f) for f in sys.meta_path]
'''

_SCRIPT = '''
import os, sys
import cv2, numpy as np, torch

def main(tmp):
    import objloader
    from objloader import make_loader
    from objloader.cam.contracam import ContraCAM, resnet_trunk
    from objloader.cam.settings import CamSettings
    from objloader.cam.crf import crf_refine
    from objloader.optional import MissingDependency
    from objloader.checkpoint import build_backbone
    from objloader.ssl.trainer import TrainConfig, train
    from objloader.store import BuildOptions, build

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(os.path.join(tmp, "src", c))
        for i in range(6):
            cv2.imwrite(os.path.join(tmp, "src", c, f"{i}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    data = os.path.join(tmp, "built")
    build(os.path.join(tmp, "src"), data, BuildOptions(masks="none", max_res=48), formats=("wds",), workers=1,
          log=lambda *a, **k: None)

    loader = make_loader(data, "torch", batch_size=4, image_size=32, num_workers=1, device="cpu")
    batch = next(iter(loader))
    assert batch.views.shape == (4, 2, 3, 32, 32) and torch.isfinite(batch.views).all()

    out = train(TrainConfig(method="moco", loader="torch", data=data, width=8, image_size=32, batch_size=4,
                            epochs=1, max_steps=1, workers=1, out=os.path.join(tmp, "run"), progress=False))
    assert out["step"] == 1 and os.path.isfile(out["checkpoint"])

    net = build_backbone("resnet18", width=8)
    masks = ContraCAM(resnet_trunk(net), torch.nn.Linear(64, 16), CamSettings(iterations=2, mask_res=8))(
        torch.randn(3, 3, 32, 32))
    assert masks.shape == (3, 8, 8)

    ffcv_build = lambda: build(os.path.join(tmp, "src"), os.path.join(tmp, "built_ffcv"),
                               BuildOptions(masks="none", max_res=48), formats=("ffcv",), workers=1,
                               log=lambda *a, **k: None)
    for call, extras in ((lambda: make_loader(data, "ffcv", batch_size=4, image_size=32), ["ffcv"]),
                         (ffcv_build, ["ffcv"]),
                         (lambda: make_loader(data, "dali", batch_size=4, image_size=32), ["dali", "dali-cuda12"]),
                         (lambda: crf_refine(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)), ["crf"])):
        try:
            call()
        except MissingDependency as e:
            assert all(f"pip install 'objloader[{x}]'" in str(e) for x in extras) and "\\n" not in str(e), e
        else:
            raise AssertionError(f"no MissingDependency naming objloader[{extras[0]}]")
    import sitecustomize
    loaded = [m for m in sys.modules if sitecustomize.hidden(m)]
    assert not loaded, loaded
    print("ALL OK")

if __name__ == "__main__":  # the torch engine's workers come from a forkserver
    main(sys.argv[1])
'''


def test_core_install_imports_builds_wds_trains_a_step_and_names_each_missing_extra(tmp_path, monkeypatch):
    hidden, hidden_dists = _not_in_core_install(_setup_kwargs(monkeypatch)["install_requires"])
    # the libraries of the extras and of the test tools are among what a core install lacks
    assert {"ffcv", "nvidia.dali", "pydensecrf", "pytest", "hypothesis"} <= set(hidden), hidden
    assert {"ffcv", "nvidia-dali-cuda130", "pydensecrf2", "pytest"} <= set(hidden_dists), hidden_dists
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_HIDE % (tuple(hidden), tuple(hidden_dists)))
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_require_names_the_feature_and_the_package():
    assert require("pydensecrf.utils", "x").__name__ == "pydensecrf.utils"  # installed here: the module
    with pytest.raises(ValueError, match="not one of"):
        require("numpy", "anything")


def test_missing_dependency_message(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("pydensecrf"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(MissingDependency, match=r"the dense-CRF.*pip install 'objloader\[crf\]'"):
        require("pydensecrf.densecrf", "the dense-CRF refinement")

