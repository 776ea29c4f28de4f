"""What the store writes and reads back is what it claims to be (DESIGN.md, "Store: staging,
identity, verification"): staged chunks never run code and a damaged one is redone; every file
carries its build's identity and a file of another build is refused at open; --verify compares
every per-record list of the manifest and the engines read labels from the records; an empty
format list is refused; a full disk is one line naming the file; OA-Crop / BG-Mixup are refused
on a dataset built without masks."""
import dataclasses
import errno
import glob
import json
import os
import pickle
import shutil

import cv2
import numpy as np
import pytest
import torch

from objloader.cli.build import main as build_main
from objloader.errors import ObjloaderError
from objloader.loaders import make_loader
from objloader.store import BuildError, BuildOptions, DatasetError, build, read_manifest
from objloader.store import builder as build_module
from objloader.store import verify as store_verify

QUIET = dict(log=lambda *a: None)
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(n)]


def _folder(root, layout):
    """ImageFolder at root: layout = [(relative path, image)], each with a centred mask."""
    for rel, img in layout:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, img)
        mask = np.zeros(img.shape[:2], np.uint8)
        mask[10:30, 12:36] = 255
        cv2.imwrite(path[:-4] + ".mask.png", mask)
    return str(root)


def _interrupt_after_staging(monkeypatch, src, out, **kw):
    """A build killed once every chunk is staged: OUT.partial keeps its chunks and build state."""
    def killed(*a, **k):
        raise KeyboardInterrupt("simulated kill")

    with monkeypatch.context() as m:
        m.setattr(build_module, "_survey", killed)
        with pytest.raises(KeyboardInterrupt):
            build(src, out, workers=1, **kw, **QUIET)


def _stage_file(out, chunk):
    [path] = glob.glob(os.path.join(out + ".partial", ".stage", f"chunk-{chunk:06d}.*"))
    return path


# ----------------------------------------------------------------------------- 1. staged chunks

class _Planted:
    """Unpickling this creates ``marker``: what a planted chunk could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_planted_pickle_in_the_stage_never_runs(tmp_path, monkeypatch):
    src = _folder(tmp_path / "src", [(f"a/{i}.png", im) for i, im in enumerate(_images(3))])
    out = str(tmp_path / "ds")
    opts = BuildOptions(masks="gt", max_res=32, mask_res=8)
    _interrupt_after_staging(monkeypatch, src, out, opts=opts, formats=("wds",))
    stage = os.path.dirname(_stage_file(out, 0))
    marker = str(tmp_path / "code-ran")
    payload = pickle.dumps([_Planted(marker)])
    for name in ("chunk-000000.pkl", "chunk-000000.npz"):  # the old format's name and the new one's
        with open(os.path.join(stage, name), "wb") as f:
            f.write(payload)
    logs, error = [], None
    try:
        build(src, out, opts, formats=("wds",), workers=1, log=logs.append)
    except Exception as e:  # noqa: BLE001 - the marker is the assertion that matters
        error = e
    assert not os.path.exists(marker), "a planted stage file ran code when the build resumed"
    assert error is None, error
    assert any("chunk-000000.npz" in line and "redoing" in line for line in logs), logs
    assert read_manifest(out)["counts"]["records"] == 3


def test_a_staged_record_comes_back_with_every_field(tmp_path):
    """Every field of Record survives the stage, so a resumed build loses nothing (a field added to
    Record and not to the stage fails here)."""
    from objloader.store.schema import Record
    from objloader.store.staging import read_chunk, write_chunk

    rng = np.random.default_rng(0)
    values = {"key": "a/b.jpg", "sha1": "f" * 40, "image": b"\xff\xd8jpeg", "height": 31, "width": 47, "label": 3,
              "mask": rng.integers(0, 256, (8, 8), dtype=np.uint8),
              "boxes": rng.random((4, 4), dtype=np.float32), "n_boxes": 2,
              "bg_rect": np.array([0.1, 0.2, 0.5, 0.6], np.float32),
              "gt_mask": rng.integers(0, 256, (8, 8), dtype=np.uint8),
              "gt_boxes": rng.random((4, 4), dtype=np.float32), "n_gt_boxes": 4,
              "notes": ["grayscale"], "boxes_dropped": 5, "gt_boxes_dropped": 7}
    assert set(values) == {f.name for f in dataclasses.fields(Record)}, "give the new field a value here"
    record = Record(**values)
    write_chunk(str(tmp_path), 0, ["a/b.jpg", "c.jpg"], [record, "unreadable: c.jpg"])
    back, skip = read_chunk(str(tmp_path), 0, ["a/b.jpg", "c.jpg"])
    assert skip == "unreadable: c.jpg"
    for f in dataclasses.fields(Record):
        got, want = getattr(back, f.name), values[f.name]
        assert (np.array_equal(got, want) if isinstance(want, np.ndarray) else got == want), f.name


def test_a_truncated_chunk_is_redone_and_the_output_equals_an_uninterrupted_build(tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "CHUNK", 2)  # 5 inputs: chunks of 2, 2 and 1
    src = _folder(tmp_path / "src", [(f"a/{i}.png", im) for i, im in enumerate(_images(5))])
    opts = BuildOptions(masks="gt", max_res=32, mask_res=8, shard_size=3)
    whole = str(tmp_path / "whole")
    build(src, whole, opts, formats=("wds",), workers=1, **QUIET)

    out = str(tmp_path / "ds")
    _interrupt_after_staging(monkeypatch, src, out, opts=opts, formats=("wds",))
    chunk = _stage_file(out, 1)
    with open(chunk, "r+b") as f:
        f.truncate(os.path.getsize(chunk) // 2)
    logs = []
    build(src, out, opts, formats=("wds",), workers=1, log=logs.append)
    warned = [line for line in logs if "chunk-000001" in line]
    assert len(warned) == 1 and "redoing" in warned[0] and "\n" not in warned[0], logs
    a, b = read_manifest(whole), read_manifest(out)
    assert a["records"] == b["records"] and a["checksums"] == b["checksums"]
    assert a.get("dataset_id") == b.get("dataset_id")


# ----------------------------------------------------------------------------- 2. build identity

@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two datasets of the same images, keys and file sizes that differ in their labels: A's
    records are a/0 a/1 b/0 b/1 (labels 0 0 1 1), B's a/0 a/1 a/2 b/0 (0 0 0 1). Two shards each."""
    root = tmp_path_factory.mktemp("twins")
    images = _images(4, seed=7)
    opts = BuildOptions(masks="gt", max_res=32, mask_res=8, shard_size=2)
    out = {}
    for name, rels in (("A", ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]),
                       ("B", ["a/0.png", "a/1.png", "a/2.png", "b/0.png"])):
        src = _folder(root / f"src{name}", list(zip(rels, images)))
        out[name] = root / name
        build(src, str(out[name]), opts, workers=1, **QUIET)
    return out


SWAPS = [("data.beton", "ffcv"), ("shards/shard-00001.tar", "torch"), ("shards/shard-00001.tar", "dali"),
         ("shards/shard-00000.idx", "torch"), ("shards/shard-00000.idx", "dali")]


@pytest.mark.parametrize("rel,engine", SWAPS)
def test_a_file_of_another_build_is_refused_at_open(twins, tmp_path, rel, engine):
    ds = tmp_path / "ds"
    shutil.copytree(twins["A"], ds)
    assert os.path.getsize(ds / rel) == os.path.getsize(twins["B"] / rel)  # sizes cannot tell them apart
    shutil.copyfile(twins["B"] / rel, ds / rel)
    with pytest.raises(DatasetError) as e:
        make_loader(str(ds), engine, batch_size=2, image_size=16, num_workers=0, device="cpu")
    message = str(e.value)
    assert f"{ds}/{rel}:" in message and "another build" in message and "\n" not in message


def test_intact_twins_open_in_every_engine(twins):
    for engine in ("torch", "ffcv", "dali"):
        make_loader(str(twins["A"]), engine, batch_size=2, image_size=16, num_workers=0, device="cpu")


# ------------------------------------------------------------------ 3. the manifest's label lists

def test_an_edited_manifest_label_fails_verify_and_no_engine_uses_it(twins, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(twins["A"], ds)
    m = json.loads((ds / "manifest.json").read_text())
    true_labels = list(m["records"]["labels"])
    m["records"]["labels"][0] = 1  # record 0 (a/0.png) is class 0; the manifest has no checksum of its own
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError) as e:
        store_verify.verify(str(ds), log=lambda *a: None)
    assert "record 0 ('a/0.png')" in str(e.value) and "label" in str(e.value)
    for engine in ("torch", "ffcv", "dali"):
        loader = make_loader(str(ds), engine, batch_size=4, image_size=16, num_workers=0, device="cpu",
                             shuffle=False, drop_last=False, color="none", normalize=False, dtype=torch.uint8)
        batch = next(iter(loader))
        assert batch.labels.tolist() == [true_labels[i] for i in batch.index.tolist()], engine


# ---------------------------------------------------------------------------- 4. no data files

def test_an_empty_format_list_is_refused_at_the_cli(tmp_path, capsys):
    src = _folder(tmp_path / "src", [("a/0.png", _images(1)[0])])
    assert build_main([src, str(tmp_path / "ds"), "--formats", ",", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("objloader-build: error:") and "format" in err and "\n" not in err
    assert not (tmp_path / "ds").exists()


def test_a_dataset_without_data_files_is_refused(twins, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(twins["A"], ds)
    m = json.loads((ds / "manifest.json").read_text())
    m["formats"], m["shards"], m["checksums"], m["sizes"] = [], [], {}, {}
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="lists no data files"):
        store_verify.verify(str(ds), log=lambda *a: None)
    for engine in ("torch", "ffcv", "dali"):
        with pytest.raises(DatasetError):
            make_loader(str(ds), engine, batch_size=2, image_size=16, num_workers=0, device="cpu")


# ------------------------------------------------------------------------------- 5. a full disk

@pytest.fixture
def small_src(tmp_path):
    return _folder(tmp_path / "src", [(f"a/{i}.png", im) for i, im in enumerate(_images(3))])


def _no_space_build(src, out, formats):
    with pytest.raises(BuildError) as e:
        build(src, out, BuildOptions(masks="gt", max_res=32, mask_res=8, shard_size=2), formats=formats,
              workers=1, **QUIET)
    message = str(e.value)
    assert "no space left on device" in message and "\n" not in message
    leftovers = [p for p in glob.glob(out + ".partial/**", recursive=True) if ".tmp" in os.path.basename(p)]
    assert leftovers == []
    return message


def test_a_full_disk_at_the_beton_finalize_is_one_line(small_src, tmp_path, monkeypatch):
    from ffcv.writer import DatasetWriter

    def full(self, allocations):
        with open(self.fname, "ab") as f:
            f.write(b"\0" * 100)  # some of it landed
        raise ENOSPC

    monkeypatch.setattr(DatasetWriter, "finalize", full)
    message = _no_space_build(small_src, str(tmp_path / "ds"), ("ffcv",))
    assert str(tmp_path / "ds.partial" / "data.beton.tmp") in message


def test_a_full_disk_at_a_beton_page_is_one_line(small_src, tmp_path, monkeypatch):
    from ffcv.memory_allocator import MemoryAllocator

    def full(self):
        raise ENOSPC

    monkeypatch.setattr(MemoryAllocator, "flush_page", full)  # the writer processes are forked: they inherit it
    message = _no_space_build(small_src, str(tmp_path / "ds"), ("ffcv",))
    assert str(tmp_path / "ds.partial" / "data.beton.tmp") in message


def test_a_full_disk_at_a_shard_write_is_one_line(small_src, tmp_path, monkeypatch):
    import tarfile

    real = tarfile.TarFile.addfile

    def addfile(self, *a, **k):
        if self.name.endswith("shard-00001.tar"):  # the disk fills up in the second shard
            raise ENOSPC
        return real(self, *a, **k)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    message = _no_space_build(small_src, str(tmp_path / "ds"), ("wds",))
    assert "shard-00001.tar" in message
    assert not os.path.exists(str(tmp_path / "ds.partial" / "shards.tmp"))


@dataclasses.dataclass
class _Cfg:
    method: str = "moco"
    arch: str = "resnet18"
    small_stem: bool = True
    width: int = 8
    image_size: int = 32


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(2, 2)


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_a_full_disk_at_a_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch, where):
    from objloader.ssl import run_io

    model = _Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = str(tmp_path / "run" / "checkpoint.pt")
    run_io.save_checkpoint(path, _Cfg(), model, opt, None, step=3, epoch=0)

    def full(*a, **k):
        raise ENOSPC

    monkeypatch.setattr(os, where, full)
    with pytest.raises(ObjloaderError) as e:
        run_io.save_checkpoint(path, _Cfg(), model, opt, None, step=7, epoch=1)
    monkeypatch.undo()
    message = str(e.value)
    assert path in message and "no space left on device" in message and "\n" not in message
    assert os.listdir(tmp_path / "run") == ["checkpoint.pt"]  # no temporary file left
    assert torch.load(path, weights_only=True)["step"] == 3


# ------------------------------------------------------------ 6. object-aware ops without masks

def test_oa_crop_and_bg_mixup_are_refused_on_a_dataset_built_without_masks(small_src, tmp_path):
    out = str(tmp_path / "none")
    build(small_src, out, BuildOptions(masks="none", max_res=32, mask_res=8), formats=("wds",), workers=1, **QUIET)
    args = dict(batch_size=2, image_size=16, num_workers=0, device="cpu")
    for ops in (dict(oa_crop=True), dict(bg_mixup=0.4), dict(oa_crop=True, bg_mixup=0.4)):
        with pytest.raises(ObjloaderError) as e:
            make_loader(out, "torch", **args, **ops)
        assert "'none'" in str(e.value) and "--masks gt" in str(e.value)
    make_loader(out, "torch", **args)  # the plain loader is fine
