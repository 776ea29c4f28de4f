"""objloader-build --verify: first every file against the manifest (presence, size, SHA-256, and
the structure that integrity.check_integrity checks), one line per damaged file; then, for a dataset
whose files are all intact, every record read back through FFCV and through DALI and each field
checked bit-exactly against the digests in the manifest."""
from __future__ import annotations

import json
import os
from typing import Callable, List, Optional

import cv2
import numpy as np

from ..optional import require
from .builder import file_sha256
from ..errors import DatasetError
from .integrity import dataset_dirs, describe_problems, integrity_problems, read_manifest, stat_problems
from .reader import BuiltDataset
from .schema import BETON_FILE, MANIFEST_FILE, MEMBER, ffcv_fields, record_digest, wds_members

BATCH = 64

# FFCV loaders are kept until the process ends: when one is collected while others still run,
# numba's dispatcher finaliser raises (harmless) KeyError tracebacks on stderr.
_LOADERS = []


def _check(name: str, manifest: dict, got: dict) -> None:
    """Every per-record list of the manifest (integrity.RECORD_LISTS: keys, digests, labels, box
    counts) equals what the records hold, record by record; ``got``: list name -> the values read
    back. The digests cover the stored fields, but the loaders and users also read the manifest's
    own copies (a label edited there alone must not pass)."""
    want = manifest["records"]
    n = len(want["digests"])
    if len(got["digests"]) != n:
        raise DatasetError(f"{name}: read {len(got['digests'])} records, manifest lists {n}")
    keys = got["keys"]
    for i in range(n):
        if keys[i] != want["keys"][i]:
            raise DatasetError(f"{name}: record {i} has key {keys[i]!r}, manifest says {want['keys'][i]!r}")
        if got["digests"][i] != want["digests"][i]:
            raise DatasetError(f"{name}: record {i} ({keys[i]!r}) differs from the manifest "
                               f"(digest {got['digests'][i]} != {want['digests'][i]})")
        for field, what in (("labels", "label"), ("n_boxes", "box count")):
            if got[field][i] != want[field][i]:
                raise DatasetError(f"{name}: record {i} ({keys[i]!r}) has {what} {got[field][i]}, the manifest's "
                                   f"records.{field} says {want[field][i]!r} (manifest edited?); rebuild the dataset")


def _beton_storage(path: str):
    """(ffcv Reader, the file as uint8 memmap, data pointer -> size from the allocation table)."""
    from ffcv.reader import Reader

    r = Reader(path)
    table = {int(p): int(s) for p, s in zip(r.alloc_table["ptr"], r.alloc_table["size"])}
    return r, np.memmap(path, dtype=np.uint8, mode="r"), table


def _beton_column(r, name: str) -> np.ndarray:
    # ffcv's metadata record has unnamed slots in field order.
    return r.metadata[r.metadata.dtype.names[r.field_names.index(name)]]


def _beton_jpegs(path: str) -> List[bytes]:
    """The image field's stored bytes, through ffcv's own Reader (allocation table lookup)."""
    r, data, table = _beton_storage(path)
    out = []
    for p in _beton_column(r, "image")["data_ptr"]:
        size = table[int(p)]
        out.append(bytes(data[int(p):int(p) + size]))
    return out


def _beton_digests(path: str, manifest: dict) -> List[Optional[str]]:
    """Each record's digest (schema.record_digest) from the beton's stored bytes, decoding
    nothing; None for a record whose pointers lead nowhere. Locates damage in a beton whose
    checksum no longer matches, without running decoders on damaged data."""
    r, data, table = _beton_storage(path)
    m, k = manifest["options"]["mask_res"], manifest["options"]["max_boxes"]
    u8, f32 = np.dtype(np.uint8), np.dtype(np.float32)

    def stored(ptr, dtype: np.dtype, count: int) -> np.ndarray:  # an NDArrayField slot is its data pointer
        ptr = int(ptr)
        return data[ptr:ptr + count * dtype.itemsize].view(dtype)

    image, label = _beton_column(r, "image")["data_ptr"], _beton_column(r, "label")
    mask, boxes, bg = (_beton_column(r, f) for f in ("mask", "boxes", "bg_rect"))
    n_boxes = _beton_column(r, "n_boxes")
    if manifest["has_gt"]:
        gt_mask, gt_boxes, n_gt = (_beton_column(r, f) for f in ("gt_mask", "gt_boxes", "n_gt_boxes"))
    out = []
    for i in range(int(r.num_samples)):
        p = int(image[i])
        try:
            gt = ((stored(gt_mask[i], u8, m * m), stored(gt_boxes[i], f32, 4 * k), int(n_gt[i]))
                  if manifest["has_gt"] else (None, None, 0))
            out.append(record_digest(bytes(data[p:p + table[p]]), int(label[i]), stored(mask[i], u8, m * m),
                                     stored(boxes[i], f32, 4 * k), int(n_boxes[i]), stored(bg[i], f32, 4), *gt))
        except (KeyError, ValueError):  # a pointer the allocation table does not know, or cut short
            out.append(None)
    return out


def verify_ffcv(ds_dir: str, manifest: dict) -> int:
    require("ffcv", "objloader-build --verify of data.beton")
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.bytes import BytesDecoder
    from ffcv.fields.json import JSONField
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    path = os.path.join(ds_dir, BETON_FILE)
    has_gt = manifest["has_gt"]
    decoders = {
        # Decoding through ffcv's JPEG path proves the loaders can read every image.
        "image": lambda: CenterCropRGBImageDecoder((32, 32), ratio=1.0),
        "label": IntDecoder, "n_boxes": IntDecoder, "n_gt_boxes": IntDecoder, "key": BytesDecoder,
        "mask": NDArrayDecoder, "boxes": NDArrayDecoder, "bg_rect": NDArrayDecoder,
        "gt_mask": NDArrayDecoder, "gt_boxes": NDArrayDecoder,
    }
    pipelines = {name: [decoders[name]()] for name in ffcv_fields(has_gt)}
    loader = Loader(path, batch_size=BATCH, num_workers=min(4, os.cpu_count() or 1),
                    order=OrderOption.SEQUENTIAL, drop_last=False, pipelines=pipelines)
    _LOADERS.append(loader)
    names = list(pipelines)
    jpegs = _beton_jpegs(path)
    got = {"keys": [], "digests": [], "labels": [], "n_boxes": []}
    for batch in loader:
        f = dict(zip(names, batch))
        metas = JSONField.unpack(f["key"])
        for j in range(len(metas)):
            i = len(got["keys"])
            gt = (f["gt_mask"][j], f["gt_boxes"][j], int(f["n_gt_boxes"][j].item())) if has_gt else (None, None, 0)
            label, n_boxes = int(f["label"][j].item()), int(f["n_boxes"][j].item())
            got["digests"].append(record_digest(jpegs[i], label, f["mask"][j], f["boxes"][j], n_boxes,
                                                f["bg_rect"][j], *gt))
            got["keys"].append(metas[j]["key"])
            got["labels"].append(label)
            got["n_boxes"].append(n_boxes)
    _check(f"{path} (FFCV)", manifest, got)
    return len(got["keys"])


def verify_dali(ds_dir: str, manifest: dict) -> int:
    require("nvidia.dali", "objloader-build --verify of the WebDataset shards through DALI")
    from nvidia.dali import fn, pipeline_def, types

    shards = [os.path.join(ds_dir, s) for s in manifest["shards"]]
    has_gt = manifest["has_gt"]
    ext = list(wds_members(has_gt))
    n = len(manifest["records"]["keys"])

    @pipeline_def(batch_size=BATCH, num_threads=min(4, os.cpu_count() or 1), device_id=None,
                  prefetch_queue_depth=1)
    def read_all():
        parts = fn.readers.webdataset(paths=shards, index_paths=[s[:-4] + ".idx" for s in shards], ext=ext,
                                      missing_component_behavior="error", random_shuffle=False,
                                      pad_last_batch=True, name="reader")
        part = dict(zip(ext, parts))  # the reader yields one output per ext, in ext's order
        jpg = part[MEMBER.image]
        decoded = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)  # every image must decode
        outs = [jpg, decoded.shape(), part[MEMBER.label],
                fn.decoders.image(part[MEMBER.mask], device="cpu", output_type=types.GRAY),
                fn.decoders.numpy(part[MEMBER.boxes]), fn.decoders.numpy(part[MEMBER.bg_rect]), part[MEMBER.meta]]
        if has_gt:
            outs += [fn.decoders.image(part[MEMBER.gt_mask], device="cpu", output_type=types.GRAY),
                     fn.decoders.numpy(part[MEMBER.gt_boxes])]
        return tuple(outs)

    pipe = read_all()
    pipe.build()
    got = {"keys": [], "digests": [], "labels": [], "n_boxes": []}
    keys = got["keys"]
    while len(keys) < n:
        out = [o.as_array() if o.is_dense_tensor() else [np.array(o[k]) for k in range(len(o))] for o in pipe.run()]
        for j in range(BATCH):
            if len(keys) == n:
                break
            meta = json.loads(bytes(out[6][j]).decode())
            h, w, _ = out[1][j]
            if (int(h), int(w)) != (meta["height"], meta["width"]):
                raise DatasetError(f"{ds_dir} (DALI): record {len(keys)} decodes to {h}x{w}, stored as "
                                   f"{meta['height']}x{meta['width']}")
            gt = (out[7][j][..., 0], out[8][j], meta["n_gt_boxes"]) if has_gt else (None, None, 0)
            label = int(bytes(out[2][j]).decode())
            got["digests"].append(record_digest(bytes(out[0][j]), label, out[3][j][..., 0],
                                                out[4][j], meta["n_boxes"], out[5][j], *gt))
            keys.append(meta["key"])
            got["labels"].append(label)
            got["n_boxes"].append(meta["n_boxes"])
    _check(f"{ds_dir} (DALI)", manifest, got)
    return len(keys)


def _differing_records(bad: List[int], keys: List[str], elsewhere: str) -> str:
    """The part of a damaged file's line that says which records the damage reaches."""
    if not bad:
        return f"no record's digested fields differ: the damage is in {elsewhere}"
    shown = ", ".join(f"{i} ({keys[i]!r})" for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return f"record{'s' if len(bad) > 1 else ''} {shown} differ{'' if len(bad) > 1 else 's'} from the manifest's digests"


def _locate_in_shards(ds_dir: str, manifest: dict, tars: List[str]) -> dict:
    """tar -> which of its records no longer match their digests (their .idx files are intact)."""
    ds, want, keys = BuiltDataset(ds_dir, manifest), manifest["records"]["digests"], manifest["records"]["keys"]
    found = {}
    try:
        for tar in tars:
            bad = []
            for i in ds.shard_records(tar):
                try:
                    ok = ds.digest(i) == want[i]
                except (DatasetError, ValueError, KeyError, EOFError, cv2.error):  # a member that no longer decodes
                    ok = False
                if not ok:
                    bad.append(i)
            found[tar] = _differing_records(bad, keys, "tar headers or padding, or a record's key or size (KEY.json)")
    finally:
        ds.close()
    return found


def _locate_in_beton(ds_dir: str, manifest: dict) -> str:
    """Which records of a data.beton with intact structure no longer match their digests."""
    require("ffcv", "objloader-build --verify of data.beton")
    try:
        got = _beton_digests(os.path.join(ds_dir, BETON_FILE), manifest)
    except (AssertionError, ValueError, KeyError, IndexError) as e:  # what ffcv's Reader raises on a bad header
        return f"its records cannot be located: ffcv cannot read its header ({type(e).__name__}: {e})"
    bad = [i for i, (g, w) in enumerate(zip(got, manifest["records"]["digests"])) if g != w]
    return _differing_records(bad, manifest["records"]["keys"], "field descriptors, padding, or a record's key")


def file_problems(ds_dir: str, manifest: dict) -> List[str]:
    """One line per damaged file of a dataset, 'PATH: problem; problem': missing; a size other
    than manifest["sizes"] records; a SHA-256 other than manifest["checksums"] records (with the
    records the damage reaches, when the file's structure still lets them be found); anything
    integrity.check_integrity finds for any engine. Every file is hashed; records are not decoded."""
    problems = integrity_problems(ds_dir, manifest)
    checksums = manifest.get("checksums")
    if not isinstance(checksums, dict):
        problems.setdefault(MANIFEST_FILE, []).append("lists no checksums; the files' contents cannot be checked")
        checksums = {}
    sizes = manifest.get("sizes") if isinstance(manifest.get("sizes"), dict) else {}
    only_checksum = []  # files whose one problem is their checksum: their records can be located
    for rel, want in checksums.items():
        facts = problems.setdefault(rel, [])
        size, stat_facts = stat_problems(ds_dir, rel, sizes)
        facts += [f for f in stat_facts if f not in facts]
        if size is None or stat_facts:  # absent, or a size that already proves the contents differ
            continue
        got = file_sha256(os.path.join(ds_dir, rel))
        if got != want:
            facts.append(f"sha256 mismatch: expected {want}, found {got}")
            if len(facts) == 1:
                only_checksum.append(rel)
    problems = {rel: facts for rel, facts in problems.items() if facts}
    # Records can be found through the .idx files and the manifest only when those are intact.
    if not any(rel == MANIFEST_FILE or rel.endswith(".idx") for rel in problems):
        tars = [rel for rel in only_checksum if rel in manifest["shards"] and "wds" in manifest["formats"]]
        if tars:
            for tar, where in _locate_in_shards(ds_dir, manifest, tars).items():
                problems[tar][0] += f"; {where}"
        if BETON_FILE in only_checksum:
            problems[BETON_FILE][0] += f"; {_locate_in_beton(ds_dir, manifest)}"
    order = sorted(problems, key=lambda rel: (rel != MANIFEST_FILE, rel != BETON_FILE, rel))
    return describe_problems(ds_dir, {rel: problems[rel] for rel in order})


def verify(path: str, log: Callable = print) -> dict:
    """Verify a built dataset or every dataset of a collection; returns {dataset: {reader: records}}.

    Raises DatasetError listing every problem found, one line each: damaged files first (the
    records of a dataset with a damaged file are not read back: the file checks already say what
    is wrong, and decoders fed damaged bytes fail without saying where), then records that
    differ from the manifest."""
    report, problems = {}, []
    for ds_dir in dataset_dirs(path):
        try:
            manifest = read_manifest(ds_dir)
        except DatasetError as e:
            problems.append(str(e))
            continue
        damaged = file_problems(ds_dir, manifest)
        if damaged:
            problems += damaged
            continue
        counts = {}
        readers = [(name, read_back) for fmt, name, read_back in (("ffcv", "ffcv", verify_ffcv), ("wds", "dali", verify_dali))
                   if fmt in manifest["formats"]]
        for name, read_back in readers:
            try:
                counts[name] = read_back(ds_dir, manifest)
            except DatasetError as e:
                problems.append(str(e))
        if len(counts) == len(readers):
            report[ds_dir] = counts
            log(f"verified {ds_dir}: " + ", ".join(f"{k} {v} records ok" for k, v in counts.items()))
    if len(problems) == 1:
        raise DatasetError(f"verification of {path} failed: {problems[0]}")
    if problems:
        raise DatasetError(f"verification of {path} failed, {len(problems)} problems:\n"
                           + "\n".join("  " + line for line in problems))
    return report
