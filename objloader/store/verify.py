"""objloader-build --verify: re-read every record through FFCV and through DALI and check each
field bit-exactly against the digests in the manifest."""
from __future__ import annotations

import json
import os
from typing import Callable, List

import numpy as np

from ..optional import require
from .reader import DatasetError, read_manifest
from .schema import record_digest

BATCH = 64

# FFCV loaders are kept until the process ends: when one is collected while others still run,
# numba's dispatcher finaliser raises (harmless) KeyError tracebacks on stderr.
_LOADERS = []


def _check(name: str, manifest: dict, got_keys: List[str], got_digests: List[str]) -> None:
    want_keys, want = manifest["records"]["keys"], manifest["records"]["digests"]
    if len(got_digests) != len(want):
        raise DatasetError(f"{name}: read {len(got_digests)} records, manifest lists {len(want)}")
    for i, (k, d) in enumerate(zip(got_keys, got_digests)):
        if k != want_keys[i]:
            raise DatasetError(f"{name}: record {i} has key {k!r}, manifest says {want_keys[i]!r}")
        if d != want[i]:
            raise DatasetError(f"{name}: record {i} ({k!r}) differs from the manifest (digest {d} != {want[i]})")


def _beton_jpegs(path: str) -> List[bytes]:
    """The image field's stored bytes, through ffcv's own Reader (allocation table lookup)."""
    from ffcv.reader import Reader

    r = Reader(path)
    # ffcv's metadata record has unnamed slots in field order.
    ptrs = r.metadata[r.metadata.dtype.names[r.field_names.index("image")]]["data_ptr"]
    table = {int(p): int(s) for p, s in zip(r.alloc_table["ptr"], r.alloc_table["size"])}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = []
    for p in ptrs:
        size = table[int(p)]
        out.append(bytes(data[int(p):int(p) + size]))
    return out


def verify_ffcv(ds_dir: str, manifest: dict) -> int:
    require("ffcv", "objloader-build --verify of data.beton")
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.bytes import BytesDecoder
    from ffcv.fields.json import JSONField
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    path = os.path.join(ds_dir, "data.beton")
    has_gt = manifest["has_gt"]
    pipelines = {
        # Decoding through ffcv's JPEG path proves the loaders can read every image.
        "image": [CenterCropRGBImageDecoder((32, 32), ratio=1.0)],
        "label": [IntDecoder()], "mask": [NDArrayDecoder()], "boxes": [NDArrayDecoder()],
        "n_boxes": [IntDecoder()], "bg_rect": [NDArrayDecoder()], "key": [BytesDecoder()],
    }
    if has_gt:
        pipelines.update(gt_mask=[NDArrayDecoder()], gt_boxes=[NDArrayDecoder()], n_gt_boxes=[IntDecoder()])
    loader = Loader(path, batch_size=BATCH, num_workers=min(4, os.cpu_count() or 1),
                    order=OrderOption.SEQUENTIAL, drop_last=False, pipelines=pipelines)
    _LOADERS.append(loader)
    names = list(pipelines)
    jpegs = _beton_jpegs(path)
    keys, digests = [], []
    for batch in loader:
        f = dict(zip(names, batch))
        metas = JSONField.unpack(f["key"])
        for j in range(len(metas)):
            i = len(keys)
            gt = (f["gt_mask"][j], f["gt_boxes"][j], int(f["n_gt_boxes"][j].item())) if has_gt else (None, None, 0)
            digests.append(record_digest(jpegs[i], int(f["label"][j].item()), f["mask"][j], f["boxes"][j],
                                         int(f["n_boxes"][j].item()), f["bg_rect"][j], *gt))
            keys.append(metas[j]["key"])
    _check(f"{path} (FFCV)", manifest, keys, digests)
    return len(keys)


def verify_dali(ds_dir: str, manifest: dict) -> int:
    require("nvidia.dali", "objloader-build --verify of the WebDataset shards through DALI")
    from nvidia.dali import fn, pipeline_def, types

    shards = [os.path.join(ds_dir, s) for s in manifest["shards"]]
    has_gt = manifest["has_gt"]
    ext = ["jpg", "cls", "mask.png", "boxes.npy", "bg.npy", "json"] + (["gt_mask.png", "gt_boxes.npy"] if has_gt else [])
    n = len(manifest["records"]["keys"])

    @pipeline_def(batch_size=BATCH, num_threads=min(4, os.cpu_count() or 1), device_id=None,
                  prefetch_queue_depth=1)
    def read_all():
        parts = fn.readers.webdataset(paths=shards, index_paths=[s[:-4] + ".idx" for s in shards], ext=ext,
                                      missing_component_behavior="error", random_shuffle=False,
                                      pad_last_batch=True, name="reader")
        jpg, cls, mask, boxes, bg, meta = parts[:6]
        decoded = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)  # every image must decode
        outs = [jpg, decoded.shape(), cls, fn.decoders.image(mask, device="cpu", output_type=types.GRAY),
                fn.decoders.numpy(boxes), fn.decoders.numpy(bg), meta]
        if has_gt:
            outs += [fn.decoders.image(parts[6], device="cpu", output_type=types.GRAY), fn.decoders.numpy(parts[7])]
        return tuple(outs)

    pipe = read_all()
    pipe.build()
    keys, digests = [], []
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
            digests.append(record_digest(bytes(out[0][j]), int(bytes(out[2][j]).decode()), out[3][j][..., 0],
                                         out[4][j], meta["n_boxes"], out[5][j], *gt))
            keys.append(meta["key"])
    _check(f"{ds_dir} (DALI)", manifest, keys, digests)
    return len(keys)


def verify(path: str, log: Callable = print) -> dict:
    """Verify a built dataset or every dataset of a collection; raises DatasetError on a mismatch."""
    from .reader import dataset_dirs

    report = {}
    for ds_dir in dataset_dirs(path):
        manifest = read_manifest(ds_dir)
        counts = {}
        if "ffcv" in manifest["formats"]:
            counts["ffcv"] = verify_ffcv(ds_dir, manifest)
        if "wds" in manifest["formats"]:
            counts["dali"] = verify_dali(ds_dir, manifest)
        report[ds_dir] = counts
        log(f"verified {ds_dir}: " + ", ".join(f"{k} {v} records ok" for k, v in counts.items()))
    return report
