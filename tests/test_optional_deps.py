"""objloader without its optional libraries (ffcv, nvidia.dali, pydensecrf), as on a GPU machine
that has torch alone: the torch engine (with workers), a trainer step and ContraCAM still run,
and asking for a feature whose library is missing names the pip package to install."""
import os
import subprocess
import sys
import textwrap

import pytest

from objloader.optional import MissingDependency, require

# Imported first in every Python process started with it on PYTHONPATH (torch engine workers
# from the forkserver included): a finder that makes the optional libraries unimportable.
_HIDE = '''
import importlib.abc, sys
_HIDDEN = ("ffcv", "nvidia.dali", "pydensecrf")
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == h or name.startswith(h + ".") for h in _HIDDEN):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None
sys.meta_path.insert(0, _Hide())
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

    for call, package in ((lambda: make_loader(data, "ffcv", batch_size=4, image_size=32), "pip install ffcv==1.0.2"),
                          (lambda: make_loader(data, "dali", batch_size=4, image_size=32),
                           "pip install nvidia-dali-cuda130"),
                          (lambda: crf_refine(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)),
                           "pip install pydensecrf2")):
        try:
            call()
        except MissingDependency as e:
            assert package in str(e), e
        else:
            raise AssertionError(f"no MissingDependency for {package}")
    hidden = [m for m in sys.modules if m.split(".")[0] in ("ffcv", "pydensecrf") or m.startswith("nvidia.dali")]
    assert not hidden, hidden
    print("ALL OK")

if __name__ == "__main__":  # the torch engine's workers come from a forkserver
    main(sys.argv[1])
'''


def test_torch_engine_trainer_and_contracam_run_without_ffcv_dali_pydensecrf(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_HIDE)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_require_names_the_feature_and_the_package():
    assert require("ffcv", "x") is not None  # installed here: returns the module
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
    with pytest.raises(MissingDependency, match=r"the dense-CRF.*pip install pydensecrf2==1\.1"):
        require("pydensecrf.densecrf", "the dense-CRF refinement")

