"""store/schema.py is the one record-schema contract: every WebDataset member name, the FFCV
field list and the file names are spelled there and nowhere else (DESIGN.md, "Record schema")."""
from __future__ import annotations

import ast
import os

import numpy as np
import pytest

from objloader.store import schema
from objloader.store.schema import BETON_FILE, MANIFEST_FILE, MEMBER, WDS_MEMBERS, Record, ffcv_fields, wds_members
from objloader.store.wds_writer import record_members

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_PY = os.path.join(REPO, "objloader", "store", "schema.py")

# Names that say which member or file they are: spelled anywhere else, they are a second list.
_NAMES = {suffix for suffix in WDS_MEMBERS.values() if "." in suffix} | {MANIFEST_FILE, BETON_FILE, MEMBER.label}
# "jpg" and "json" are also common words (ffcv's image mode, DALI output names): a literal of
# them is a member name when it picks a member of a record read through BuiltDataset.raw.
_WORDS = {MEMBER.image, MEMBER.meta}


def _record(with_gt: bool) -> Record:
    m = np.zeros((8, 8), np.uint8)
    gt = dict(gt_mask=m, gt_boxes=np.zeros((2, 4), np.float32), n_gt_boxes=0) if with_gt else {}
    return Record(key="k", sha1="0" * 40, image=b"\xff\xd8", height=4, width=4, label=3, mask=m,
                  boxes=np.zeros((2, 4), np.float32), n_boxes=0, bg_rect=np.zeros(4, np.float32), **gt)


@pytest.mark.parametrize("with_gt", [False, True])
def test_the_writer_stores_the_members_the_schema_lists_in_its_order(with_gt):
    assert tuple(s for s, _ in record_members(_record(with_gt), with_gt)) == wds_members(with_gt)


@pytest.mark.parametrize("with_gt", [False, True])
def test_the_beton_is_written_with_the_schema_field_list(with_gt):
    pytest.importorskip("ffcv")
    from objloader.store.ffcv_writer import _fields
    from objloader.store.schema import BuildOptions

    assert tuple(_fields(BuildOptions(), with_gt)) == ffcv_fields(with_gt)
    assert set(ffcv_fields(with_gt)) - {"key"} <= set(Record.__dataclass_fields__)  # named as the Record's


def _docstrings(tree) -> set:
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return {id(n.body[0].value) for n in nodes
            if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def _member_literals(path: str) -> list:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if node.value in _NAMES:
                found.append((node.lineno, node.value))
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id.startswith("raw"):
            key = node.slice
            if isinstance(key, ast.Constant) and key.value in _WORDS:
                found.append((key.lineno, key.value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "raw":
            for arg in node.args[1:]:
                for c in ast.walk(arg):
                    if isinstance(c, ast.Constant) and c.value in _WORDS:
                        found.append((c.lineno, c.value))
    return found


def test_no_member_or_file_name_is_spelled_outside_the_schema():
    bad = []
    for top in ("objloader", "benchmarks", "train"):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                path = os.path.join(dirpath, f)
                if f.endswith(".py") and path != SCHEMA_PY:
                    bad += [f"{os.path.relpath(path, REPO)}:{line}: {value!r}" for line, value in _member_literals(path)]
    assert not bad, "import these names from objloader/store/schema.py:\n" + "\n".join(bad)


def test_the_literal_scan_finds_a_member_name(tmp_path):
    """The scan above is not vacuous: each kind of spelling it looks for is found."""
    src = tmp_path / "m.py"
    src.write_text('"""doc: manifest.json"""\nraw = ds.raw(i, ("jpg",))\nx = raw["json"]\np = "data.beton"\n')
    assert [v for _, v in _member_literals(str(src))] == ["jpg", "json", "data.beton"]


def test_the_schema_names_what_the_design_lists():
    # DESIGN.md's member list, as files are named on disk.
    assert [f"KEY.{s}" for s in wds_members(False)] == ["KEY.jpg", "KEY.cls", "KEY.mask.png", "KEY.boxes.npy",
                                                        "KEY.bg.npy", "KEY.json"]
    assert schema.record_name(12) == "000000012" and MANIFEST_FILE == "manifest.json"
