"""objloader-cam: ContraCAM masks for every image of a source, in a resumable mask store.

A mask store is a directory:

    run.json                   what is being computed (checkpoint hash, settings, source fingerprint)
    <dataset>/chunk-000012.npz one batch of images: keys, sha1 (of the source file's bytes),
                               masks uint8 [n, R, R] over the unit square, reasons ("" = masked)
    masks.json                 written last, once every chunk exists: the store is complete

A chunk is one ContraCAM batch (its images are each other's negatives), cut from the source's
sample list at fixed positions, so the masks do not depend on how many ranks computed them or
whether the run was interrupted. Ranks under torchrun take chunks round-robin; chunk files are
written atomically, so a rerun computes only the missing ones. Every mask carries its image's key
and content hash: the build pairs by key and refuses a hash mismatch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..augment.reference import normalize
from ..checkpoint import load_encoder
from ..errors import CamError, ConfigError
from ..fileio import file_sha256, write_json_atomic
from ..procs import DieWithOwner, dist_failure, raise_if_worker_died
from ..ranges import DIST_TIMEOUT
from ..runtime import DEFAULT_DIST_TIMEOUT, barrier, choose_device, default_workers, join_process_group, ranks
from ..sources.decode import DecodeLimits, SkipRecord, decode_image
from ..sources.resolve import source_fingerprint
from .contracam import ContraCAM, resnet_trunk
from .crf import CRFConfig, crf_pool, crf_refine_batch
from .settings import MIN_CAM_CELLS, CamSettings

__all__ = ["CamSettings", "CamError", "MaskArchive", "compute_masks", "load_contracam", "prepare_rgb",
           "explain_batch", "refine_batch", "ContraCAMMasks"]

STORE_FORMAT = "objloader-cam/1"
RUN = "run.json"
COMPLETE = "masks.json"


def load_contracam(checkpoint: str, settings: CamSettings, device="cpu"):
    """(ContraCAM in eval mode on ``device``, input side in pixels, checkpoint metadata). A
    checkpoint without a projection head (a torchvision / timm classifier, a bare backbone) is
    explained on the backbone's pooled features: z = normalize(pool(A))."""
    backbone, head, meta = load_encoder(checkpoint)
    head = torch.nn.Identity() if head is None else head
    for module in (backbone, head):
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CamError(f"checkpoint {checkpoint!r} is damaged: {name} holds NaN or inf values, "
                               "so every mask would be empty")
    trunk = resnet_trunk(backbone, settings.stride_expansion)
    size = settings.image_size or 2 * int(meta.get("image_size") or 112)
    _check_cam_size(size, _trunk_stride(trunk), settings, meta)
    model = ContraCAM(trunk, head, settings).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # gradients are taken with respect to activations only
    return model, size, meta


def _trunk_stride(trunk: torch.nn.Module) -> int:
    """Input pixels per feature-map cell, measured (stem, stride expansion and arch all change it)."""
    probe = 128
    with torch.no_grad():
        side = trunk.eval()(torch.zeros(1, 3, probe, probe)).shape[-1]
    return max(probe // max(side, 1), 1)


def _check_cam_size(size: int, stride: int, settings: CamSettings, meta: dict) -> None:
    """Refuse an input too small for a usable CAM (MIN_CAM_CELLS cells a side) or too large for
    memory, whether it was asked for or derived from the checkpoint."""
    origin = ("asked for" if settings.image_size else
              f"2 x the checkpoint's training size {meta['image_size']}" if meta.get("image_size") else
              "the default for a checkpoint that records no training size")
    allowed = CamSettings.RANGES["image_size"]
    minimum = max(MIN_CAM_CELLS * stride, int(allowed.lo))
    if size < minimum:
        raise ConfigError(f"ContraCAM image size {size} px ({origin}) is too small: the trunk's stride is {stride}, so "
                          f"its feature map would be {size // stride} x {size // stride} cells and a CAM needs >= "
                          f"{MIN_CAM_CELLS} a side; pass an image size >= {minimum} (objloader-cam --image-size, "
                          "objloader-build --cam-image-size)")
    if size > allowed.hi:
        raise ConfigError(f"ContraCAM image size {size} px ({origin}) {allowed.limits()}; pass a smaller image size "
                          "(objloader-cam --image-size, objloader-build --cam-image-size)")


def prepare_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """The whole image, squashed to [size, size, 3] uint8 (masks live on the unit square)."""
    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp)


def explain_batch(model: ContraCAM, rgb: np.ndarray, device="cpu") -> List[np.ndarray]:
    """ContraCAM of a batch of prepared images uint8 [B, S, S, 3]: the aggregated masks after each
    iteration, float32 [B, R, R] in [0, 1] (the first is single-step ContraCAM)."""
    x = torch.from_numpy(rgb).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    steps = [s.float().cpu().numpy() for s in model(normalize(x), return_steps=True)]
    # A damaged encoder does not fail loudly: NaN masks become 0 when stored as uint8 and the build
    # would bake records without boxes. A single image can have an empty CAM; a whole batch cannot.
    if not all(np.isfinite(s).all() for s in steps):
        raise CamError("ContraCAM produced NaN or inf for this batch: the encoder's activations are not "
                       "finite (damaged checkpoint, or images far outside its input range)")
    if len(rgb) > 1 and not steps[0].any():
        raise CamError(f"every ContraCAM mask of a batch of {len(rgb)} images is empty: no channel of the "
                       "encoder has a positive weight (damaged or untrained checkpoint?)")
    return steps


def refine_batch(rgb: np.ndarray, masks: np.ndarray, pool: Optional[ProcessPoolExecutor] = None,
                 cfg: CRFConfig = CRFConfig()) -> np.ndarray:
    """Dense-CRF refinement of float masks [B, R, R] on their prepared images [B, S, S, 3]; the CRF
    runs at the image's resolution, its object marginal comes back at R."""
    return np.stack(crf_refine_batch(rgb, masks, cfg, pool=pool, out_size=masks.shape[-1])).astype(np.float32)


def to_uint8(masks: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(masks * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# reading the source


class _SourceChunks(Dataset):
    """Chunk c of a sample list -> its images decoded once and prepared at the input size."""

    def __init__(self, samples, chunks: Sequence[int], batch_size: int, size: int, opts: DecodeLimits):
        self.samples, self.chunks, self.batch_size, self.size, self.opts = samples, list(chunks), batch_size, size, opts

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        c = self.chunks[i]
        lo, hi = chunk_bounds(len(self.samples), self.batch_size, c)
        images = np.zeros((hi - lo, self.size, self.size, 3), np.uint8)
        keys, sha1s, reasons = [], [], []
        for k, s in enumerate(self.samples[lo:hi]):
            sha1, reason = "", ""
            try:
                data = s.read_bytes()
                sha1 = hashlib.sha1(data).hexdigest()
                rgb, _, _ = decode_image(data, self.opts)  # the build's decoding: same skips, same colour fixes
                images[k] = prepare_rgb(rgb, self.size)
            except (SkipRecord, ValueError) as e:  # SourceError is a ValueError
                reason = str(e) or type(e).__name__
            keys.append(s.key)
            sha1s.append(sha1)
            reasons.append(reason)
        return {"chunk": c, "images": images, "keys": keys, "sha1": sha1s, "reasons": reasons}


def _first(batch):
    return batch[0]


# ---------------------------------------------------------------------------------------------
# the store


def _part_dir(root: str, name: str) -> str:
    return os.path.join(root, name or "_")


def _chunk_path(root: str, name: str, c: int) -> str:
    return os.path.join(_part_dir(root, name), f"chunk-{c:06d}.npz")


def _write_chunk(path: str, keys, sha1s, masks: np.ndarray, reasons) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, keys=np.array(keys, dtype=str), sha1=np.array(sha1s, dtype=str), masks=masks,
             reasons=np.array(reasons, dtype=str))
    os.replace(tmp, path)  # a chunk file exists only when it is complete


class MaskArchive:
    """A complete mask store (objloader-cam's output directory) read back: per dataset, key -> (sha1,
    uint8 mask or None, skip reason). Not part of objloader.store: the builder reaches it only
    through ContraCAMMasks, a MaskProvider."""

    def __init__(self, root: str):
        path = os.path.join(root, COMPLETE)
        if not os.path.isfile(path):
            hint = " (an interrupted run? rerun objloader-cam with the same arguments to finish it)" \
                if os.path.isfile(os.path.join(root, RUN)) else ""
            raise CamError(f"{root!r} is not a complete ContraCAM mask store: no {COMPLETE}{hint}")
        with open(path, encoding="utf-8") as f:
            self.info = json.load(f)
        if self.info.get("format") != STORE_FORMAT:
            raise CamError(f"{root!r}: mask store format {self.info.get('format')!r}, expected {STORE_FORMAT}")
        self.root = root
        self.names = list(self.info["datasets"])

    def entries(self, name: str) -> Dict[str, tuple]:
        """key -> (sha1, mask uint8 [R, R] or None, reason) of dataset ``name``. A store of a single
        dataset also answers for a build of a single dataset (its name is then ""), whatever its name."""
        if name not in self.info["datasets"]:
            if len(self.names) == 1 and name == "":
                name = self.names[0]
            else:
                raise CamError(f"mask store {self.root!r} has no masks for dataset {name or '(the source)'!r}; "
                               f"it holds {', '.join(repr(n or '(the source)') for n in self.names)}")
        out = {}
        for c in range(self.info["datasets"][name]["chunks"]):
            with np.load(_chunk_path(self.root, name, c)) as z:
                for key, sha1, mask, reason in zip(z["keys"], z["sha1"], z["masks"], z["reasons"]):
                    if key in out:
                        raise CamError(f"mask store {self.root!r}: key {key!r} appears twice in {name!r}")
                    out[str(key)] = (str(sha1), None if reason else mask, str(reason))
        return out


def _barrier(world: int, timeout: float = DEFAULT_DIST_TIMEOUT) -> None:
    if world <= 1:
        return
    try:
        barrier()
    except RuntimeError as e:
        if dist_failure(e) is None:
            raise
        raise CamError(f"rank {dist.get_rank()}: another rank did not reach the barrier within --dist-timeout "
                       f"{timeout:g} s (stopped, killed or still computing); raise --dist-timeout if it is only "
                       f"slow, then rerun: finished chunks are kept") from e


def run_fingerprint(specs, checkpoint_sha256: str, settings: CamSettings, opts: DecodeLimits) -> str:
    h = hashlib.sha1(json.dumps([STORE_FORMAT, checkpoint_sha256, settings.to_dict(), opts.min_size,
                                 opts.max_pixels]).encode())
    h.update(source_fingerprint(specs).encode())
    return h.hexdigest()


def compute_masks(specs, out: str, checkpoint: str, settings: CamSettings = CamSettings(), *,
                  opts: DecodeLimits = DecodeLimits(), workers: Optional[int] = None, device: Optional[str] = None,
                  overwrite: bool = False, progress: bool = True, log: Callable = print,
                  dist_timeout: float = DEFAULT_DIST_TIMEOUT) -> dict:
    """ContraCAM masks of every sample of ``specs`` (see objloader.sources) into the store ``out``;
    returns its masks.json. Resumes an interrupted run with the same arguments; refuses to mix a
    different run into an existing store unless ``overwrite``. Under torchrun a rank waits at
    most ``dist_timeout`` seconds for the others at a barrier."""
    DIST_TIMEOUT.check("dist_timeout", dist_timeout, "compute_masks", CamError)
    r = ranks()
    rank, world = r.rank, r.world_size
    dev = choose_device(device, r)
    # The device's own backend (nccl on CUDA): a barrier needs no more, but any collective on
    # CUDA tensors would fail on gloo.
    join_process_group(dev, dist_timeout, r)
    workers = workers or default_workers(r)
    if not os.path.isfile(checkpoint):
        raise CamError(f"checkpoint {checkpoint!r} does not exist")
    # before the store is touched: a checkpoint or image size it refuses leaves no run behind
    model, size, meta = load_contracam(checkpoint, settings, dev)
    if rank == 0 and (meta["source_format"] != "objloader" or meta["projection"] != "head"):
        z = "its projection head" if meta["projection"] == "head" else "the pooled backbone features (no projection head)"
        log(f"{checkpoint}: {meta['source_format']} {meta['arch']} checkpoint; ContraCAM's z = {z}")
    ckpt_sha = file_sha256(checkpoint)
    fingerprint = run_fingerprint(specs, ckpt_sha, settings, opts)
    run_path, done_path = os.path.join(out, RUN), os.path.join(out, COMPLETE)
    if rank == 0:
        old = None
        for path in (done_path, run_path):
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    old = json.load(f).get("fingerprint")
                break
        if old is None and os.path.isdir(out) and os.listdir(out) and not overwrite:
            raise CamError(f"{out!r} exists and is not a mask store of this run; pass --overwrite to replace it")
        if old is not None and old != fingerprint:
            if not overwrite:
                raise CamError(f"{out!r} holds masks of a different run (checkpoint, settings or source differ); "
                               "pass --overwrite to replace them")
            shutil.rmtree(out)
        if os.path.isfile(done_path) and old == fingerprint:
            log(f"{out}: masks of this run are already complete")
        os.makedirs(out, exist_ok=True)
        write_json_atomic(run_path, {"format": STORE_FORMAT, "fingerprint": fingerprint,
                                     "checkpoint": os.path.abspath(checkpoint), "checkpoint_sha256": ckpt_sha,
                                     "settings": settings.to_dict()})
    _barrier(world, dist_timeout)
    if os.path.isfile(done_path):
        with open(done_path, encoding="utf-8") as f:
            return json.load(f)

    t0 = time.time()
    pool = crf_pool(workers) if settings.crf else None
    try:
        for spec in specs:
            _compute_spec(spec, out, model, size, settings, opts, dev, rank, world, pool,
                          max(1, min(4, workers // 2)), progress)
    finally:
        if pool is not None:
            pool.shutdown()
    seconds = time.time() - t0
    _barrier(world, dist_timeout)
    if rank == 0:
        datasets = {}
        for spec in specs:
            n_chunks = _n_chunks(spec, settings)
            missing = [c for c in range(n_chunks) if not os.path.isfile(_chunk_path(out, spec.name, c))]
            if missing:
                raise CamError(f"{out}: {len(missing)} chunk(s) of {spec.name or 'the source'!r} are missing after "
                               "every rank finished; rerun to compute them")
            skipped = []
            for c in range(n_chunks):
                with np.load(_chunk_path(out, spec.name, c)) as z:
                    skipped += [{"key": str(k), "reason": str(r)} for k, r in zip(z["keys"], z["reasons"]) if r]
            datasets[spec.name] = {"images": len(spec.samples), "chunks": n_chunks,
                                   "masked": len(spec.samples) - len(skipped), "skipped": skipped}
        info = {"format": STORE_FORMAT, "fingerprint": fingerprint, "checkpoint": os.path.abspath(checkpoint),
                "checkpoint_sha256": ckpt_sha, "method": meta.get("method"), "arch": meta.get("arch"),
                "width": meta.get("width"), "settings": settings.to_dict(), "input_size": size, "device": str(dev),
                "ranks": world,
                "seconds_last_run": round(seconds, 3), "datasets": datasets}
        write_json_atomic(done_path, info)
        for name, d in datasets.items():
            log(f"contracam {name or 'masks'}: {d['masked']} masked, {len(d['skipped'])} skipped")
    _barrier(world, dist_timeout)
    with open(done_path, encoding="utf-8") as f:
        return json.load(f)


def n_chunks(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


def chunk_bounds(n: int, batch_size: int, c: int) -> tuple:
    """Samples [lo, hi) of chunk c: whole batches, the last one absorbing the remainder, so that no
    image is explained in a batch too small to hold negatives."""
    lo = c * batch_size
    return lo, (n if c == n_chunks(n, batch_size) - 1 else lo + batch_size)


def _n_chunks(spec, settings: CamSettings) -> int:
    return n_chunks(len(spec.samples), settings.batch_size)


def _compute_spec(spec, out, model, size, settings, opts, dev, rank, world, pool, decoders, progress) -> None:
    os.makedirs(_part_dir(out, spec.name), exist_ok=True)
    todo = [c for c in range(rank, _n_chunks(spec, settings), world)
            if not os.path.isfile(_chunk_path(out, spec.name, c))]
    if not todo:
        return
    reader = _SourceChunks(spec.samples, todo, settings.batch_size, size, opts)
    # Decoding runs ahead in worker processes while the model explains the previous batch.
    loader = DataLoader(reader, batch_size=1, collate_fn=_first, num_workers=decoders,
                        multiprocessing_context=multiprocessing.get_context("forkserver"),
                        worker_init_fn=DieWithOwner())  # workers end with this process, even killed
    it = iter(loader)
    bounds = [chunk_bounds(len(spec.samples), settings.batch_size, c) for c in todo]
    n_todo = sum(hi - lo for lo, hi in bounds)
    label = f"contracam {spec.name}" if spec.name else "contracam"
    with tqdm(total=n_todo, desc=label + (f" rank {rank}" if world > 1 else ""), unit="img", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        while True:
            try:
                chunk = next(it, None)
            except Exception as e:  # noqa: BLE001 - a dead worker surfaces as several kinds of error
                raise_if_worker_died(it, f"contracam {spec.name or 'source'} decoding", e)
                raise
            if chunk is None:
                break
            ok = np.array([r == "" for r in chunk["reasons"]])
            masks = np.zeros((len(ok), settings.mask_res, settings.mask_res), np.uint8)
            if ok.sum() >= 2:
                rgb = chunk["images"][ok]
                soft = explain_batch(model, rgb, dev)[-1]
                if settings.crf:
                    soft = refine_batch(rgb, soft, pool)
                masks[ok] = to_uint8(soft)
            else:
                # Without another image in the batch there are no negatives: the score is constant.
                for k in np.flatnonzero(ok):
                    chunk["reasons"][k] = "no other decodable image in its ContraCAM batch (no negatives)"
            _write_chunk(_chunk_path(out, spec.name, chunk["chunk"]), chunk["keys"], chunk["sha1"], masks,
                         chunk["reasons"])
            bar.update(len(ok))


@dataclasses.dataclass(frozen=True)
class ContraCAMMasks:
    """The masks of ``objloader-build --masks contracam`` (a store.MaskProvider): ContraCAM run
    inline from a ``checkpoint`` with ``settings``, or the ``store`` of an earlier objloader-cam run."""

    checkpoint: Optional[str] = None
    settings: Optional[CamSettings] = None
    store: Optional[str] = None

    def validate(self) -> None:
        if bool(self.checkpoint) == bool(self.store):
            raise CamError("--masks contracam needs either --checkpoint CKPT (run ContraCAM now) or "
                           "--cam-masks DIR (the output of objloader-cam), not both")
        if self.checkpoint and not os.path.isfile(self.checkpoint):
            raise CamError(f"checkpoint {self.checkpoint!r} does not exist")
        if self.store and not os.path.isfile(os.path.join(self.store, COMPLETE)):
            raise CamError(f"{self.store!r} is not a complete ContraCAM mask store (no {COMPLETE}); "
                           "run or finish objloader-cam first")

    def identity(self) -> dict:
        if self.store:
            with open(os.path.join(self.store, COMPLETE), encoding="utf-8") as f:
                return {"store": json.load(f)["fingerprint"]}
        return {"checkpoint_sha256": file_sha256(self.checkpoint), "settings": (self.settings or CamSettings()).to_dict()}

    def entries(self, spec, work_dir: str, opts, workers: int, log: Callable):
        if self.store:
            store = MaskArchive(self.store)
        else:
            compute_masks([spec], work_dir, self.checkpoint, self.settings or CamSettings(), opts=opts,
                          workers=workers, log=log)
            store = MaskArchive(work_dir)
        info = {k: store.info[k] for k in ("checkpoint", "checkpoint_sha256", "method", "arch", "settings",
                                           "input_size")}
        info["store"] = os.path.abspath(self.store) if self.store else None
        return store.entries(spec.name), info
