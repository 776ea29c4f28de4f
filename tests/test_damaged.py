"""Damaged datasets: objloader-build --verify names every damaged file in one line, the engines'
open-time check (integrity.check_integrity) refuses what they would misread, and an unreadable
manifest is a one-line DatasetError."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from objloader.cli.build import main as build_main
from objloader.store import BuildOptions, BuiltDataset, DatasetError, build, open_dataset, read_manifest
from objloader.store import integrity as store_integrity
from objloader.store import reader as store_reader
from objloader.store import verify as store_verify
from objloader.store.reader import read_index

ENGINES = ("torch", "dali", "ffcv")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """6 records (3 classes x 2) in two shards of 4 and 2, with ground-truth masks."""
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(3)
    for c in ("a", "b", "c"):
        os.makedirs(src / c)
        for i in range(2):
            h, w = int(rng.integers(32, 64)), int(rng.integers(32, 64))
            mask = np.zeros((h, w), np.uint8)
            mask[h // 4:h // 2, w // 4:w // 2] = 255
            cv2.imwrite(str(src / c / f"{i}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            cv2.imwrite(str(src / c / f"{i}.mask.png"), mask)
    out = tmp_path_factory.mktemp("out") / "ds"
    build(str(src), str(out), BuildOptions(masks="gt", max_res=48, mask_res=16, shard_size=4), workers=1,
          log=lambda *a: None)
    return out


def _copy(built, tmp_path, sizes=False):
    """A private copy of the dataset to damage. ``sizes``: the manifest records every checksummed
    file's size (manifest["sizes"], relative path -> bytes, as the builder writes it), or, False,
    it records none, as in datasets built before the builder wrote them."""
    ds = tmp_path / "ds"
    shutil.copytree(built, ds)

    def set_sizes(m):
        m.pop("sizes", None)
        if sizes:
            m["sizes"] = {rel: os.path.getsize(ds / rel) for rel in m["checksums"]}

    _edit_manifest(ds, set_sizes)
    return ds


def _edit_manifest(ds, change):
    m = read_manifest(str(ds))
    change(m)
    (ds / "manifest.json").write_text(json.dumps(m))


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))


def _member(ds, shard, record, suffix):
    """(offset, size) of a record's member inside its shard, from the shard's .idx."""
    for entry in read_index(str(ds / "shards" / f"shard-{shard:05d}.idx")):
        offset, size, name = entry[suffix]
        if name.startswith(f"{record:09d}."):
            return offset, size
    raise AssertionError(f"record {record} not in shard {shard}")


def _beton_mask_offset(ds, record):
    from ffcv.reader import Reader

    r = Reader(str(ds / "data.beton"))
    return int(r.metadata[r.metadata.dtype.names[r.field_names.index("mask")]][record])  # NDArray slot: pointer


def _verify_fails(ds) -> str:
    with pytest.raises(DatasetError) as e:
        store_verify.verify(str(ds), log=lambda *a: None)
    return str(e.value)


def _cli_verify_fails(ds, capsys) -> str:
    """objloader-build --verify: exit status 2 and a message, never a traceback."""
    assert build_main(["--verify", str(ds)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("objloader-build: error: verification of") and "Traceback" not in err
    return err


def _refused(ds, engine, manifest=None) -> str:
    with pytest.raises(DatasetError) as e:
        store_integrity.check_integrity(str(ds), manifest, engine)
    return str(e.value)


# --- objloader-build --verify ---------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["jpg", "boxes.npy", "cls"])
def test_verify_names_the_shard_and_record_of_a_flipped_member_byte(built, tmp_path, capsys, suffix):
    ds = _copy(built, tmp_path)
    m = read_manifest(str(ds))
    offset, size = _member(ds, 0, 1, suffix)
    _flip(ds / "shards" / "shard-00000.tar", offset + size // 2)
    msg = _verify_fails(ds)
    assert "\n" not in msg  # one problem, one line
    assert (f"{ds}/shards/shard-00000.tar: sha256 mismatch: expected {m['checksums']['shards/shard-00000.tar']}, "
            f"found ") in msg
    assert f"record 1 ({m['records']['keys'][1]!r}) differs from the manifest's digests" in msg
    assert "data.beton" not in msg and "shard-00001" not in msg and ".idx" not in msg
    assert f"{ds}/shards/shard-00000.tar: sha256 mismatch" in _cli_verify_fails(ds, capsys)


def test_verify_names_the_beton_and_record_of_a_flipped_byte(built, tmp_path):
    ds = _copy(built, tmp_path)
    m = read_manifest(str(ds))
    _flip(ds / "data.beton", _beton_mask_offset(ds, 2) + 7)
    msg = _verify_fails(ds)
    assert "\n" not in msg
    assert f"{ds}/data.beton: sha256 mismatch: expected {m['checksums']['data.beton']}, found " in msg
    assert f"record 2 ({m['records']['keys'][2]!r}) differs from the manifest's digests" in msg
    assert "shards/" not in msg


def test_verify_collects_every_damaged_file(built, tmp_path, capsys):
    ds = _copy(built, tmp_path, sizes=True)
    offset, size = _member(ds, 1, 4, "jpg")
    _flip(ds / "shards" / "shard-00001.tar", offset + size // 2)
    _flip(ds / "data.beton", _beton_mask_offset(ds, 0))
    want_idx = os.path.getsize(ds / "shards" / "shard-00000.idx")
    os.remove(ds / "shards" / "shard-00000.idx")
    msg = _verify_fails(ds)
    lines = msg.splitlines()
    assert lines[0] == f"verification of {ds} failed, 3 problems:"
    assert lines[1].startswith(f"  {ds}/data.beton: sha256 mismatch: expected ")
    assert lines[2] == f"  {ds}/shards/shard-00000.idx: missing (expected {want_idx} bytes)"
    assert lines[3].startswith(f"  {ds}/shards/shard-00001.tar: sha256 mismatch: expected ")
    assert len(lines) == 4
    assert _cli_verify_fails(ds, capsys).count("\n  ") == 3


@pytest.mark.parametrize("sizes", [False, True], ids=["no-sizes", "sizes"])
def test_verify_reports_a_truncated_beton_in_one_line(built, tmp_path, capsys, sizes):
    ds = _copy(built, tmp_path, sizes=sizes)
    full = os.path.getsize(ds / "data.beton")
    os.truncate(ds / "data.beton", full // 2)
    msg = _verify_fails(ds)
    assert "\n" not in msg and msg.startswith(f"verification of {ds} failed: {ds}/data.beton: ")
    assert "truncated: the allocation table starts at byte" in msg
    if sizes:
        assert f"{full // 2} bytes, expected {full} (truncated)" in msg
    else:
        assert "sha256 mismatch" in msg
    assert f"{ds}/data.beton" in _cli_verify_fails(ds, capsys)


@pytest.mark.parametrize("damage", ["missing idx", "missing tar", "short idx"])
def test_verify_reports_a_missing_or_short_shard_file_in_one_line(built, tmp_path, capsys, damage):
    ds = _copy(built, tmp_path)
    idx, tar = ds / "shards" / "shard-00001.idx", ds / "shards" / "shard-00001.tar"
    if damage == "short idx":
        os.truncate(idx, os.path.getsize(idx) - 10)
    else:
        os.remove(idx if damage == "missing idx" else tar)
    msg = _verify_fails(ds)
    assert "\n" not in msg
    if damage == "short idx":
        assert msg.startswith(f"verification of {ds} failed: {ds}/shards/shard-00001.idx: ends in the middle of "
                              "a line (truncated); sha256 mismatch: expected ")
    else:
        assert msg == f"verification of {ds} failed: {ds}/shards/shard-00001.{damage[-3:]}: missing"
    assert f"{ds}/shards/shard-00001." in _cli_verify_fails(ds, capsys)


def test_verify_passes_an_intact_dataset_with_recorded_sizes(built, tmp_path):
    ds = _copy(built, tmp_path, sizes=True)
    assert store_verify.file_problems(str(ds), read_manifest(str(ds))) == []
    assert store_verify.verify(str(ds), log=lambda *a: None) == {str(ds): {"ffcv": 6, "dali": 6}}


# --- check_integrity: the engines' open-time check ---------------------------------------------

@pytest.mark.parametrize("sizes", [False, True], ids=["no-sizes", "sizes"])
def test_check_integrity_accepts_an_intact_dataset(built, tmp_path, sizes):
    ds = _copy(built, tmp_path, sizes=sizes)
    for engine in ENGINES:
        store_integrity.check_integrity(str(ds), None, engine)
        store_integrity.check_integrity(str(ds), read_manifest(str(ds)), engine)


def test_a_manifest_one_label_short_is_refused_before_a_dali_read(built, tmp_path):
    """The manifest lost record 0's label and counts one record less: the DALI engine used to pair
    record i with record i+1's label and die on the last record with a raw IndexError."""
    from objloader.loaders import make_loader

    ds = _copy(built, tmp_path)

    def drop_first_label(m):
        m["records"]["labels"] = m["records"]["labels"][1:]
        m["counts"]["records"] -= 1

    _edit_manifest(ds, drop_first_label)
    msg = _refused(ds, "dali")
    assert "\n" not in msg and msg.startswith("damaged dataset, the dali engine will not read it: ")
    assert (f"{ds}/manifest.json: counts.records says 5 records but records.keys lists 6, records.digests "
            f"lists 6, records.n_boxes lists 6; counts.records says 5 records, the shards' .idx files hold 6") in msg
    assert "data.beton: header says 6 records, the manifest 5" in _refused(ds, "ffcv")
    # The engines' own reader refuses it too, so no engine pairs records with other labels.
    with pytest.raises(DatasetError, match="records.keys lists 6"):
        BuiltDataset(str(ds))
    with pytest.raises(DatasetError, match="records.keys lists 6"):
        make_loader(str(ds), "dali", batch_size=2, image_size=16, num_workers=1, device="cpu")


def test_a_manifest_one_record_short_is_refused(built, tmp_path):
    ds = _copy(built, tmp_path)

    def drop_last_record(m):
        for name in m["records"]:
            m["records"][name] = m["records"][name][:-1]
        m["counts"]["records"] -= 1

    _edit_manifest(ds, drop_last_record)
    for engine in ("torch", "dali"):
        assert _refused(ds, engine) == (
            f"damaged dataset, the {engine} engine will not read it: {ds}/manifest.json: counts.records says 5 "
            f"records, the shards' .idx files hold 6 (rebuild it; objloader-build --verify {ds} checks every byte)")
    assert f"{ds}/data.beton: header says 6 records, the manifest 5" in _refused(ds, "ffcv")


@pytest.mark.parametrize("aligned", [True, False], ids=["at-a-block", "mid-block"])
def test_a_truncated_shard_is_refused_by_the_shard_engines(built, tmp_path, aligned):
    ds = _copy(built, tmp_path)
    offset, _ = _member(ds, 0, 3, "gt_boxes.npy")  # record 3 is shard 0's last; this its last member
    os.truncate(ds / "shards" / "shard-00000.tar", offset if aligned else offset + 100)
    for engine in ("torch", "dali"):
        msg = _refused(ds, engine)
        assert "\n" not in msg and f"{ds}/shards/shard-00000.tar: " in msg
        assert "truncated: record 3's gt_boxes.npy member ends at byte " in msg
        assert ("tar blocks" in msg) != aligned
    store_integrity.check_integrity(str(ds), None, "ffcv")  # FFCV does not read the shards


@pytest.mark.parametrize("cut", [None, 24, 7], ids=["half", "one-entry", "mid-entry"])
def test_a_truncated_beton_is_refused_by_the_ffcv_engine(built, tmp_path, cut):
    ds = _copy(built, tmp_path)
    size = os.path.getsize(ds / "data.beton")
    os.truncate(ds / "data.beton", size // 2 if cut is None else size - cut)
    msg = _refused(ds, "ffcv")
    assert "\n" not in msg and f"{ds}/data.beton: " in msg and "truncated" in msg
    for engine in ("torch", "dali"):  # they do not read the beton
        store_integrity.check_integrity(str(ds), None, engine)


def test_a_missing_or_short_shard_file_is_refused(built, tmp_path):
    ds = _copy(built, tmp_path)
    idx = ds / "shards" / "shard-00000.idx"
    text = idx.read_bytes()
    os.remove(idx)
    for engine in ("torch", "dali"):
        assert f"{ds}/shards/shard-00000.idx: missing" in _refused(ds, engine)
    store_integrity.check_integrity(str(ds), None, "ffcv")  # FFCV does not read the shards
    with pytest.raises(DatasetError, match="shard-00000.idx is missing"):  # not a FileNotFoundError
        BuiltDataset(str(ds))
    idx.write_bytes(text[:-10])  # cut inside the last line
    assert "shard-00000.idx: ends in the middle of a line (truncated)" in _refused(ds, "dali")
    idx.write_bytes(text[:text.rstrip(b"\n").rindex(b"\n") + 1])  # the last line gone
    msg = _refused(ds, "torch")
    assert "shard-00000.idx: lists records 0..2 under a header of 4, expected 0..3" in msg
    with pytest.raises(DatasetError, match="header says 4 samples, found 3"):
        BuiltDataset(str(ds))
    idx.write_bytes(text)
    os.remove(ds / "shards" / "shard-00001.tar")
    assert _refused(ds, "torch").startswith(
        f"damaged dataset, the torch engine will not read it: {ds}/shards/shard-00001.tar: missing (rebuild it")


def test_recorded_sizes_are_checked_when_the_manifest_has_them(built, tmp_path):
    ds = _copy(built, tmp_path)
    tar = ds / "shards" / "shard-00001.tar"
    size = os.path.getsize(tar)
    with open(tar, "ab") as f:
        f.write(bytes(512))  # one more zero block: still a well-formed tar, but not the built one
    store_integrity.check_integrity(str(ds), None, "torch")
    _edit_manifest(ds, lambda m: m.__setitem__("sizes", {"shards/shard-00001.tar": size}))
    assert f"{ds}/shards/shard-00001.tar: {size + 512} bytes, expected {size}" in _refused(ds, "torch")


def test_the_beton_layout_matches_ffcv():
    """check_integrity parses FFCV's header without importing ffcv; the layout must be ffcv's."""
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    assert store_integrity.FFCV_HEADER == HeaderType and store_integrity.FFCV_FIELD_DESC == FieldDescType
    assert store_integrity.FFCV_ALLOC_ENTRY == ALLOC_TABLE_TYPE and store_integrity.FFCV_VERSION == CURRENT_VERSION


# --- manifest.json --------------------------------------------------------------------------

@pytest.mark.parametrize("content", [None, b"cut", b"\xff\xfe\x00garbage", b"[1, 2]"],
                         ids=["missing", "cut-short", "not-utf8", "not-an-object"])
def test_an_unreadable_manifest_is_a_one_line_error(built, tmp_path, content):
    ds = _copy(built, tmp_path)
    mpath = ds / "manifest.json"
    if content is None:
        os.remove(mpath)
    elif content == b"cut":
        mpath.write_bytes(mpath.read_bytes()[:200])
    else:
        mpath.write_bytes(content)
    calls = [lambda: read_manifest(str(ds)), lambda: BuiltDataset(str(ds)), lambda: open_dataset(str(ds)),
             lambda: store_integrity.check_integrity(str(ds), None, "torch"),
             lambda: store_verify.verify(str(ds), log=lambda *a: None)]
    for call in calls:
        with pytest.raises(DatasetError) as e:
            call()
        assert "\n" not in str(e.value) and "manifest.json" in str(e.value)


def test_a_manifest_without_its_records_is_a_one_line_error(built, tmp_path):
    ds = _copy(built, tmp_path)
    _edit_manifest(ds, lambda m: m.pop("records"))
    with pytest.raises(DatasetError, match=r"manifest.json: 'records' is missing or not a dict; rebuild"):
        BuiltDataset(str(ds))
    assert "manifest.json: 'records' is missing or not a dict" in _refused(ds, "torch")


def test_the_index_arrays_read_what_the_index_lists_and_refuse_a_misaligned_index(built, tmp_path):
    """BuiltDataset keeps each shard's .idx as arrays: every record's members are the bytes the
    .idx line names, a pickled copy (one per torch worker) reads the same without the manifest,
    and an index whose lines are swapped, short of a member, or of other members is refused."""
    import pickle

    ds = BuiltDataset(str(built))
    record = 0
    for shard in range(2):
        with open(built / "shards" / f"shard-{shard:05d}.tar", "rb") as tar:
            for entry in read_index(str(built / "shards" / f"shard-{shard:05d}.idx")):
                raw = ds.raw(record)
                assert set(raw) == set(entry)
                for suffix, (offset, size, name) in entry.items():
                    assert name == f"{record:09d}.{suffix}"
                    tar.seek(offset)
                    assert raw[suffix] == tar.read(size)
                assert ds.raw(record, ("bg.npy", "jpg")).keys() == {"bg.npy", "jpg"}
                record += 1
    assert record == len(ds) == 6
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.manifest is None and [copy.raw(i) for i in range(6)] == [ds.raw(i) for i in range(6)]
    assert copy.keys[5] == ds.keys[5] == read_manifest(str(built))["records"]["keys"][5]

    idx = tmp_path / "ds" / "shards" / "shard-00000.idx"
    for damage, message in (
            (lambda lines: [lines[0], lines[2], lines[1]] + lines[3:], "line 2 does not name record 0"),
            (lambda lines: lines[:2] + [b" ".join(lines[2].split()[:-4])] + lines[3:], "different numbers of members"),
            (lambda lines: lines[:2] + [lines[2].replace(b"bg.npy", b"xx.npy")] + lines[3:], "different members"),
            (lambda lines: lines[:2] + [lines[2].replace(b" 000000001.", b" 000000007.", 1)] + lines[3:],
             "line 3 does not name record 1")):
        shutil.rmtree(tmp_path / "ds", ignore_errors=True)
        ds_dir = _copy(built, tmp_path)
        lines = idx.read_bytes().split(b"\n")
        idx.write_bytes(b"\n".join(damage(lines)))
        with pytest.raises(DatasetError, match=message):
            BuiltDataset(str(ds_dir))


def test_the_compiled_index_scan_accepts_only_what_the_general_parse_reads_the_same(built, tmp_path):
    """index_arrays scans the writer's exact layout in a compiled pass and leaves everything else
    to the general numpy parse. Property: for a written index and for thousands of one-byte edits,
    insertions and deletions of it, the scan either declines or returns exactly the general
    parse's arrays; it accepts the written index (the fast path is the one taken); and every edit
    the general parse refuses stays refused."""
    idx = str(built / "shards" / "shard-00000.idx")
    count, body = store_integrity.read_index_file(idx)

    def scan(data: bytes, first: int = 0):
        members = len(data[:data.find(b"\n")].split()) // 4
        off, size = np.zeros((count, members), np.int64), np.zeros((count, members), np.int64)
        if members and store_reader._scan_writer_index(np.frombuffer(data, np.uint8), count, first, off, size):
            return off, size
        return None

    def general(data: bytes, first: int = 0):
        try:
            return store_reader._parse_index_arrays(idx, count, data, first)[1:]
        except DatasetError:
            return None

    accepted = scan(body)
    assert accepted is not None, "the writer's own layout must take the compiled path"
    assert all(np.array_equal(a, b) for a, b in zip(accepted, general(body)))
    assert scan(body, first=1) is None and general(body, first=1) is None  # names another record
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"0123456789 .\n\tjpgnpymaskxX-", np.uint8)
    declined = 0
    for trial in range(3000):
        data = bytearray(body)
        at = int(rng.integers(0, len(data)))
        kind = trial % 3
        if kind == 0:
            data[at] = int(rng.choice(alphabet))
        elif kind == 1:
            data.insert(at, int(rng.choice(alphabet)))
        else:
            del data[at]
        data = bytes(data)
        fast, slow = scan(data), general(data)
        if fast is None:
            declined += 1
            continue
        assert slow is not None, f"trial {trial}: the scan accepted an index the general parse refuses"
        assert all(np.array_equal(a, b) for a, b in zip(fast, slow)), f"trial {trial}: arrays differ"
    assert declined > 1000  # most edits break the layout; the ones that do not (a digit for a digit) agree


def test_jpeg_shape_reads_the_frame_header_of_every_jpeg_kind_and_refuses_others():
    """The DALI engine sizes crop windows from jpeg_shape: it must equal the decoded size."""
    rng = np.random.default_rng(0)
    for h, w, options in ((37, 91, []), (300, 17, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
                          (64, 64, [cv2.IMWRITE_JPEG_OPTIMIZE, 1, cv2.IMWRITE_JPEG_QUALITY, 30])):
        ok, enc = cv2.imencode(".jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8), options)
        data = enc.tobytes()
        assert store_reader.jpeg_shape(data) == (h, w) == cv2.imdecode(enc, cv2.IMREAD_COLOR).shape[:2]
    ok, png = cv2.imencode(".png", np.zeros((4, 4), np.uint8))
    for bad in (png.tobytes(), data[:20], b""):
        with pytest.raises(DatasetError):
            store_reader.jpeg_shape(bad)
