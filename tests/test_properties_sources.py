"""Property tests of the input survey (DESIGN.md, "Inputs: one file, one record"): random source
trees (nested class folders, tiny JPEG/PNG images of random sizes, some damaged, masks for some,
duplicate stems, links to files, to folders, to an ancestor, dangling, and out of SRC to a
sentinel image) and list files (repeated and equivalent paths, paths out of their folder) are
built, and the result is checked from the outside against the files on disk:

- every image path the build surveys is a record or a counted skip, and every distinct image
  file reachable from SRC (links out of it only when followed) is a record or named by a skip;
- no two records share a source file;
- every skip has a reason and names its input path; links out of SRC name --follow-links;
- the sentinel outside SRC is never opened nor recorded unless --follow-links;
- every record is what processing its source again gives (image, mask, label, digest), in the
  WebDataset shards and, in one test, in data.beton too.

Profiles (tests/conftest.py): "ci" by default, `--hypothesis-profile thorough` for many examples.
"""
import builtins
import os
import tempfile

import cv2
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from objloader.sources import open_source  # noqa: E402
from objloader.store import BuildOptions, build, open_dataset  # noqa: E402
from objloader.store.record_builder import build_record  # noqa: E402
from objloader.store.reader import decode_rgb  # noqa: E402
from objloader.store.schema import digests_of  # noqa: E402

OPTS = dict(max_res=32, mask_res=8)
SENTINEL_SIZE = (21, 23)  # no generated image has this size: a record of this size is the sentinel


def _quiet(*_):
    pass


def _identity(path):
    st_ = os.stat(path)
    return st_.st_dev, st_.st_ino


def _write_image(path, h, w, ext, seed, damage):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    data = bytearray(cv2.imencode(ext, img)[1].tobytes())
    for pos, byte in damage:  # a few bytes changed somewhere past the signature
        data[8 + pos % max(1, len(data) - 8)] = byte
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(bytes(data))


# ---------------------------------------------------------------------------------------------
# image-folder trees

FOLDERS = ["", "c0", "c0/sub", "c1", "c1/sub/deeper"]
LINK_KINDS = ["file", "folder", "up", "dangling", "out_file", "out_folder"]

images_st = st.lists(
    st.tuples(st.sampled_from(FOLDERS), st.sampled_from("abc"), st.sampled_from([".jpg", ".png"]),
              st.integers(8, 20), st.integers(8, 20), st.booleans(),
              st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3)),
    min_size=1, max_size=7, unique_by=lambda t: (t[0], t[1] + t[2]))
links_st = st.lists(st.tuples(st.sampled_from(LINK_KINDS), st.sampled_from(FOLDERS), st.integers(0, 99)), max_size=5)


def _make_tree(td, images, links):
    """Write the tree; returns (root, the sentinel outside it)."""
    root, outside = os.path.join(td, "src"), os.path.join(td, "outside")
    sentinel = os.path.join(outside, "sentinel.png")
    _write_image(sentinel, *SENTINEL_SIZE, ".png", 999, [])
    for f in FOLDERS[1:]:
        os.makedirs(os.path.join(root, f), exist_ok=True)
    paths = []
    for n, (folder, stem, ext, h, w, with_mask, damage) in enumerate(images):
        path = os.path.join(root, folder, stem + ext)
        _write_image(path, h, w, ext, n, damage)
        if with_mask:
            mask = np.zeros((h, w), np.uint8)
            mask[h // 4:, w // 4:] = 255
            cv2.imwrite(os.path.join(root, folder, stem + ".mask.png"), mask)
        paths.append(path)
    for n, (kind, folder, pick) in enumerate(links):
        here = os.path.join(root, folder)
        if kind == "file":
            os.symlink(os.path.relpath(paths[pick % len(paths)], here), os.path.join(here, f"l{n}.png"))
        elif kind == "folder":
            target = FOLDERS[1:][pick % (len(FOLDERS) - 1)]
            os.symlink(os.path.join(root, target), os.path.join(here, f"d{n}"))
        elif kind == "up":  # an ancestor of the link's folder (or the folder itself)
            os.symlink(".." if folder and pick % 2 else ".", os.path.join(here, f"up{n}"))
        elif kind == "dangling":
            os.symlink(os.path.join(td, "nothing.png"), os.path.join(here, f"gone{n}.png"))
        elif kind == "out_file":
            os.symlink(sentinel, os.path.join(here, f"s{n}.png"))
        else:
            os.symlink(outside, os.path.join(here, f"o{n}"))
    return root, sentinel


def _expected_paths(root, follow):
    """The image paths the survey must account for, found independently of objloader: real
    image files, links named as images, and folder links (one entry each) unless followed out;
    and the distinct files reachable. A folder outside SRC that several links lead to is walked
    through one of them (which one is the walk's order): ``out_folders`` maps it to those links
    and the image names inside it, for the caller to expand."""
    real_root = os.path.realpath(root)
    paths, reachable, out_folders = [], set(), {}

    def walk(folder):
        for name in sorted(os.listdir(folder)):
            p = os.path.join(folder, name)
            image_name = name.lower().endswith((".jpg", ".png")) and not name.endswith(".mask.png")
            if os.path.islink(p):
                target = os.path.realpath(p)
                out = os.path.commonpath([target, real_root]) != real_root
                if os.path.isdir(p) and out and follow:
                    names = sorted(os.listdir(p))  # the outside folder holds images only
                    out_folders.setdefault(_identity(p), (names, []))[1].append(p)
                    reachable.update(_identity(os.path.join(p, n)) for n in names)
                elif os.path.isdir(p):
                    paths.append(p)  # one entry: a folder walked already, or not followed out
                elif image_name:
                    paths.append(p)
                    if os.path.exists(p) and (follow or not out):
                        reachable.add(_identity(p))
            elif os.path.isdir(p):
                walk(p)
            elif image_name:
                paths.append(p)
                reachable.add(_identity(p))

    walk(root)
    return paths, reachable, out_folders


def _opened_during(fn):
    """fn()'s result and the real paths of every file it opened through open()."""
    opened, real_open = [], builtins.open

    def spy(file, *a, **kw):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_open(file, *a, **kw)

    builtins.open = spy
    try:
        return fn(), opened
    finally:
        builtins.open = real_open


def _check_records_are_the_sources(out, src, follow):
    """Every record of the built dataset equals processing its source sample again."""
    samples = {s.key: s for spec in open_source(src, follow_links=follow) for s in spec.samples if s.invalid is None}
    ds = open_dataset(out)
    opts = BuildOptions(**ds.manifest["options"])  # as built: --masks gt without any mask builds as none
    digests = ds.manifest["records"]["digests"]
    for i in range(len(ds)):
        rec = ds[i]
        again = build_record(samples[rec["key"]], opts)
        np.testing.assert_array_equal(rec["image"], decode_rgb(again.image))
        np.testing.assert_array_equal(rec["mask"], again.mask)
        assert rec["label"] == again.label and rec["sha1"] == again.sha1
        assert digests[i] == digests_of(again)[1 if ds.has_gt else 0] == ds.digest(i)
    return ds


@given(images=images_st, links=links_st, follow=st.booleans(), masks=st.sampled_from(["none", "gt"]))
def test_image_folder_tree_one_file_one_record(images, links, follow, masks):
    with tempfile.TemporaryDirectory() as td:
        root, sentinel = _make_tree(td, images, links)
        opts = BuildOptions(masks=masks, **OPTS)
        out = os.path.join(td, "out")
        try:
            m, opened = _opened_during(lambda: build(root, out, opts, formats=("wds",), workers=1,
                                                     follow_links=follow, log=_quiet))
        except Exception as e:  # only "every input skipped" may end a build of such a tree
            assert "every one of" in str(e) and "skipped" in str(e), e
            return
        paths, reachable, out_folders = _expected_paths(root, follow)
        keys, skipped = m["records"]["keys"], m["skipped"]
        # every surveyed path is one record or one counted skip, and nothing else is
        surveyed = sorted([os.path.join(root, k) for k in keys] + [s["path"] for s in skipped])
        for names, links_to_it in out_folders.values():  # walked through one link, the others one entry each
            walked = [p for p in links_to_it if os.path.join(p, names[0]) in surveyed]
            assert len(walked) == 1, (links_to_it, surveyed)
            paths += [os.path.join(walked[0], n) for n in names] + [p for p in links_to_it if p != walked[0]]
        assert surveyed == sorted(paths)
        assert m["counts"]["inputs"] == len(paths) == m["counts"]["records"] + m["counts"]["skipped"]
        # no two records share a file; every reachable file is a record or named by a skip
        ids = [_identity(os.path.join(root, k)) for k in keys]
        assert len(set(ids)) == len(ids)
        assert set(ids) <= reachable
        named = {_identity(s["path"]) for s in skipped if os.path.exists(s["path"]) and not os.path.isdir(s["path"])}
        assert reachable <= set(ids) | named
        real_root = os.path.realpath(root)
        for s in skipped:
            assert s["reason"] and s["path"] in paths
            target = os.path.realpath(s["path"])
            if os.path.exists(s["path"]) and os.path.commonpath([target, real_root]) != real_root and not follow:
                assert "--follow-links" in s["reason"] and s["path"] in s["reason"]
        # the sentinel outside SRC is neither read nor recorded unless links are followed
        ds = _check_records_are_the_sources(out, root, follow)
        sentinel_records = [i for i in range(len(ds)) if ds[i]["image"].shape[:2] == SENTINEL_SIZE]
        if not follow:
            assert os.path.realpath(sentinel) not in opened and not sentinel_records
        elif any(k in ("out_file", "out_folder") for k, _, _ in links):
            assert len(sentinel_records) <= 1  # reached by any number of links: one record at most


# ---------------------------------------------------------------------------------------------
# list files

list_lines_st = st.lists(
    st.tuples(st.sampled_from(["a.png", "b.jpg", "c.png", "../sentinel.png", "ABS"]),
              st.sampled_from(["plain", "dot", "double", "dotdir", "link"]), st.integers(0, 1)),
    min_size=1, max_size=8)


def _spell(target, how, td):
    if target == "ABS":
        return os.path.join(td, "sentinel.png")
    if target.startswith(".."):
        return target
    return {"plain": f"x/{target}", "dot": f"./x/{target}", "double": f"x//{target}",
            "dotdir": f"x/./{target}", "link": f"l_{target}"}[how]


@given(lines=list_lines_st, follow=st.booleans())
def test_list_file_one_file_one_record(lines, follow):
    with tempfile.TemporaryDirectory() as td:
        lists = os.path.join(td, "lists")
        _write_image(os.path.join(td, "sentinel.png"), *SENTINEL_SIZE, ".png", 999, [])
        for n, name in enumerate(["a.png", "b.jpg", "c.png"]):
            _write_image(os.path.join(lists, "x", name), 10 + n, 12, os.path.splitext(name)[1], n, [])
            os.symlink(os.path.join("x", name), os.path.join(lists, f"l_{name}"))
        text = [f"{_spell(t, how, td)} {label}" for t, how, label in lines]
        with open(os.path.join(lists, "list.txt"), "w") as f:
            f.write("\n".join(text) + "\n")
        out = os.path.join(td, "out")
        opts = BuildOptions(masks="none", **OPTS)
        # the expectation, from the lines alone: lines naming one file make one record when they
        # agree on its label, none when they do not; lines out of the folder count only when followed
        groups = {}
        for n, (t, how, label) in enumerate(lines):
            outside = t in ("ABS", "../sentinel.png")
            if outside and not follow:
                continue
            groups.setdefault("sentinel" if outside else t, []).append((n, label))
        want = sorted(text[g[0][0]].split()[0] for g in groups.values() if len({lab for _, lab in g}) == 1)
        try:
            m, opened = _opened_during(lambda: build(os.path.join(lists, "list.txt"), out, opts, formats=("wds",),
                                                     workers=1, follow_links=follow, log=_quiet))
        except Exception as e:
            assert not want and "every one of" in str(e), e
            return
        assert sorted(m["records"]["keys"]) == want
        assert m["counts"]["records"] + m["counts"]["skipped"] == len(lines)
        for s in m["skipped"]:
            assert f"list.txt:" in s["reason"] or "same file as" in s["reason"] or "ambiguous" in s["reason"]
        if not follow:
            assert os.path.realpath(os.path.join(td, "sentinel.png")) not in opened
        _check_records_are_the_sources(out, os.path.join(lists, "list.txt"), follow)


# ---------------------------------------------------------------------------------------------
# the same, across every format the build writes cheaply (DALI reads the WebDataset shards)


@settings(max_examples=2)
@given(images=images_st, links=links_st)
def test_records_are_the_sources_in_every_format(images, links):
    pytest.importorskip("ffcv")
    from objloader.store.verify import _beton_digests

    with tempfile.TemporaryDirectory() as td:
        root, _ = _make_tree(td, images, links)
        opts = BuildOptions(masks="none", **OPTS)
        out = os.path.join(td, "out")
        try:
            m = build(root, out, opts, formats=("ffcv", "wds"), workers=1, log=_quiet)
        except Exception as e:
            assert "every one of" in str(e), e
            return
        ds = _check_records_are_the_sources(out, root, False)
        assert _beton_digests(os.path.join(out, "data.beton"), m) == m["records"]["digests"]
        assert len(ds) == m["counts"]["records"]
