"""objloader-build: sources -> records -> data.beton (FFCV) + shards/*.tar (WebDataset) + manifest.

Atomic and resumable: everything is written under OUT.partial/, records are first staged in
chunk files that exist only when complete, and OUT appears by a rename once every format and
the manifest are written. A rerun with the same source and options resumes from the staged
chunks; with different ones it starts over.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from typing import Callable, List, Optional, Sequence

from tqdm import tqdm

from ..errors import BuildError, FileWriteError, MaskPairingError, SourceError, StageError
from ..fileio import file_sha256, write_failure, write_json_atomic
from ..optional import require
from ..sources import SourceSpec, open_source
from ..sources.resolve import source_fingerprint
from .record_builder import SkipRecord, build_record
from .schema import (BETON_FILE, MANIFEST_FILE, SCHEMA_VERSION, BuildOptions, MaskProvider, Record, dataset_identity,
                     digests_of)
from .staging import CHUNK, StagedRecords, chunk_path, read_chunk, write_chunk

FORMATS = ("ffcv", "wds")
STATE = "build-state.json"
# Inside the partial output, so an interrupted build resumes the mask run too.
CAM_DIR = ".contracam"


def _fingerprint(specs: List[SourceSpec], opts: BuildOptions, formats: Sequence[str], extra=None) -> str:
    """Identity of a build: options, formats, the mask run (``extra``) and the source."""
    h = hashlib.sha1(json.dumps([opts.to_dict(), sorted(formats), SCHEMA_VERSION, extra]).encode())
    h.update(source_fingerprint(specs).encode())
    return h.hexdigest()


def _process(task):
    """Record, or the reason the sample is skipped."""
    sample, opts, cam_entry = task
    try:
        return build_record(sample, opts, cam_entry)
    except (SkipRecord, SourceError) as e:
        return str(e)


def _chunk_keys(spec: SourceSpec, c: int) -> List[str]:
    return [s.key for s in spec.samples[c * CHUNK:(c + 1) * CHUNK]]


def _stage(spec: SourceSpec, opts: BuildOptions, stage_dir: str, pool, on_error: str, label: str,
           cam_entries: Optional[dict] = None, log: Callable = print) -> int:
    """Process every sample of spec into chunk files; chunks already on disk are kept when they
    read back whole and hold this chunk's inputs, else discarded (with a warning) and redone.
    ``cam_entries``: key -> ContraCAM mask store entry, with --masks contracam."""
    os.makedirs(stage_dir, exist_ok=True)
    n_chunks = (len(spec.samples) + CHUNK - 1) // CHUNK
    todo = []
    for c in range(n_chunks):
        if not os.path.exists(chunk_path(stage_dir, c)):
            todo.append(c)
            continue
        try:
            read_chunk(stage_dir, c, _chunk_keys(spec, c))
        except StageError as e:
            log(f"warning: {label}: {e}; discarding it and redoing its inputs")
            with contextlib.suppress(FileNotFoundError):
                os.remove(chunk_path(stage_dir, c))
            todo.append(c)
    done = len(spec.samples) - sum(len(_chunk_keys(spec, c)) for c in todo)
    bar = tqdm(total=len(spec.samples), initial=done, desc=f"records {label}",
               unit="img", file=sys.stderr, dynamic_ncols=True)
    cam = cam_entries or {}
    pending = ((s, opts, cam.get(s.key)) for c in todo for s in spec.samples[c * CHUNK:(c + 1) * CHUNK])
    results = pool.imap(_process, pending, chunksize=8) if pool else map(_process, pending)
    for c in todo:
        size = len(spec.samples[c * CHUNK:(c + 1) * CHUNK])
        items = []
        for k in range(size):
            try:
                item = next(results)
            except MaskPairingError as e:
                raise BuildError(str(e)) from None
            if isinstance(item, str) and on_error == "fail":
                s = spec.samples[c * CHUNK + k]
                raise BuildError(f"record {s.key!r} ({s.path}): {item}. Use --on-error skip to skip such inputs.")
            items.append(item)
            bar.update(1)
        try:
            write_chunk(stage_dir, c, _chunk_keys(spec, c), items)
        except (FileWriteError, StageError) as e:  # a full disk, or a malformed record
            raise BuildError(str(e)) from None
    bar.close()
    return n_chunks


def _build_one(spec: SourceSpec, ds_dir: str, opts: BuildOptions, formats: Sequence[str], pool,
               workers: int, on_error: str, log: Callable, cam: Optional[MaskProvider] = None) -> dict:
    """Build one source dataset in ds_dir; returns its manifest. Steps: stage the records into
    chunk files, survey them (one read of the chunks), write each format (the FFCV writer reads
    records by index, the shard writer once in order), then the manifest."""
    label = spec.name or os.path.basename(os.path.normpath(spec.path))
    if os.path.exists(os.path.join(ds_dir, MANIFEST_FILE)):
        log(f"{label}: already built in the partial output, kept")
        with open(os.path.join(ds_dir, MANIFEST_FILE)) as f:
            return json.load(f)
    opts, masks_note = _masks_for(spec, opts, label, log)
    cam_entries = cam_info = None
    if opts.masks == "contracam":
        cam_entries, cam_info = cam.entries(spec, os.path.join(ds_dir, CAM_DIR), opts, workers, log)
    stage_dir = os.path.join(ds_dir, ".stage")
    t0 = time.time()
    n_chunks = _stage(spec, opts, stage_dir, pool, on_error, label, cam_entries, log)
    stage_seconds = time.time() - t0

    survey = _survey(spec, stage_dir, n_chunks)
    staged = StagedRecords(stage_dir, n_chunks, index=survey.index)
    if len(staged) == 0:
        raise BuildError(f"{label}: every one of {len(spec.samples)} inputs was skipped; first reason: "
                         f"{survey.skipped[0]['reason'] if survey.skipped else '?'}")
    with_gt = survey.with_gt
    if not with_gt and any(survey.gt_flags):
        log(f"{label}: only some images have ground-truth masks; gt fields are left out")
    for s in survey.skipped:
        log(f"{label}: skipped {s['key']!r}: {s['reason']}")

    # Known before any format is written, so that every file can carry it (DESIGN.md).
    identity = dataset_identity(opts.to_dict(), with_gt, survey.keys, survey.digests())
    checksums, shards = {}, []
    if "ffcv" in formats:
        checksums.update(_write_ffcv(ds_dir, staged, opts, with_gt, workers, identity))
    if "wds" in formats:
        shards, shard_checksums = _write_wds(ds_dir, staged, opts, with_gt, label, identity)
        checksums.update(shard_checksums)
    manifest = _manifest(spec, opts, formats, masks_note, cam_info, survey, shards, checksums, stage_seconds, ds_dir,
                         identity)
    _remove_leftover(stage_dir, log)
    shutil.rmtree(os.path.join(ds_dir, CAM_DIR), ignore_errors=True)
    write_json_atomic(os.path.join(ds_dir, MANIFEST_FILE), manifest)
    log(f"{label}: {len(staged)} records, {len(survey.skipped)} skipped{_dropped_note(manifest)}")
    return manifest


def _dropped_note(manifest: dict) -> str:
    """The summary line's word on boxes cut by --max-boxes; nothing when none were."""
    c, k = manifest["counts"], manifest["options"]["max_boxes"]
    note = ""
    if c["boxes_dropped"]:
        note += (f", {c['boxes_dropped']} boxes beyond --max-boxes {k} dropped (the smallest) in "
                 f"{c['records_with_boxes_dropped']} records")
    if c["gt_boxes_dropped"] != c["boxes_dropped"]:  # equal when the boxes are the ground truth's
        note += f", {c['gt_boxes_dropped']} ground-truth boxes beyond --max-boxes {k} dropped"
    return note


def _masks_for(spec: SourceSpec, opts: BuildOptions, label: str, log: Callable):
    """(options, the manifest's "masks" note) this source is built with. A whole evaluation set
    without objects (e.g. only_bg_*) under --masks gt is built without object knowledge rather
    than skipping every record, and its manifest says so."""
    if opts.masks == "gt" and not any(s.has_gt_mask for s in spec.samples):
        log(f"{label}: no ground-truth masks in this source; built with --masks none")
        return dataclasses.replace(opts, masks="none"), "none (the source has no ground-truth masks)"
    return opts, opts.masks


@dataclasses.dataclass
class _Survey:
    """What the manifest reports of the staged items, gathered in one read of the chunks."""

    index: List[tuple] = dataclasses.field(default_factory=list)  # record i -> (chunk, position)
    skipped: List[dict] = dataclasses.field(default_factory=list)  # {"key", "path", "reason"}, source order
    notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # conversions
    gt_flags: List[bool] = dataclasses.field(default_factory=list)  # per record: has a ground-truth mask
    without_bg: int = 0  # records whose background rectangle is empty
    keys: List[str] = dataclasses.field(default_factory=list)
    labels: List[int] = dataclasses.field(default_factory=list)
    n_boxes: List[int] = dataclasses.field(default_factory=list)
    # Per record: boxes beyond --max-boxes left out (of its boxes, of its gt boxes).
    boxes_dropped: List[int] = dataclasses.field(default_factory=list)
    gt_boxes_dropped: List[int] = dataclasses.field(default_factory=list)
    # Both digests of every record: which one the manifest holds (with or without the gt fields)
    # depends on with_gt, known only once every record has been seen.
    digests_without_gt: List[str] = dataclasses.field(default_factory=list)
    digests_with_gt: List[str] = dataclasses.field(default_factory=list)

    @property
    def with_gt(self) -> bool:
        """The dataset keeps the gt fields only when every record has them."""
        return all(self.gt_flags)

    def digests(self) -> List[str]:
        """Each record's digest over the fields the formats store (schema.record_digest)."""
        return self.digests_with_gt if self.with_gt else self.digests_without_gt


def _survey(spec: SourceSpec, stage_dir: str, n_chunks: int) -> _Survey:
    """One pass over the staged chunks (items in source order: a Record, or a skip reason)."""
    sv = _Survey()
    for c in range(n_chunks):
        try:
            items = read_chunk(stage_dir, c, _chunk_keys(spec, c))
        except StageError as e:  # _stage has just checked or written it: changed since, by someone else
            raise BuildError(f"{e}; rerun the build to redo it") from None
        for k, item in enumerate(items):
            if isinstance(item, Record):
                sv.index.append((c, k))
                sv.notes.update(item.notes)
                sv.gt_flags.append(item.gt_mask is not None)
                sv.without_bg += _area(item.bg_rect) == 0
                sv.keys.append(item.key)
                sv.labels.append(item.label)
                sv.n_boxes.append(item.n_boxes)
                sv.boxes_dropped.append(item.boxes_dropped)
                sv.gt_boxes_dropped.append(item.gt_boxes_dropped)
                without_gt, with_gt = digests_of(item)
                sv.digests_without_gt.append(without_gt)
                sv.digests_with_gt.append(with_gt)
            else:
                s = spec.samples[c * CHUNK + k]
                sv.skipped.append({"key": s.key, "path": s.path, "reason": item})
    return sv


def _write_ffcv(ds_dir: str, staged: StagedRecords, opts: BuildOptions, with_gt: bool, workers: int,
                identity: str) -> dict:
    """data.beton, written beside and renamed into place; returns its checksum. A failed write
    (a full disk) leaves no data.beton.tmp behind."""
    from .ffcv_writer import write_beton

    tmp = os.path.join(ds_dir, BETON_FILE + ".tmp")
    try:
        write_beton(tmp, staged, opts, with_gt, workers, identity)
        os.replace(tmp, os.path.join(ds_dir, BETON_FILE))
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise BuildError(write_failure(tmp, e)) from None
    return {BETON_FILE: file_sha256(os.path.join(ds_dir, BETON_FILE))}


def _write_wds(ds_dir: str, staged: StagedRecords, opts: BuildOptions, with_gt: bool, label: str, identity: str):
    """shards/ (tars and their .idx), written beside and renamed into place; returns the tar
    names and the checksums of every file. A failed write (a full disk) names the file and
    leaves no shards.tmp behind."""
    from .wds_writer import write_shards

    tmp = os.path.join(ds_dir, "shards.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tqdm(total=len(staged), desc=f"shards {label}", unit="rec", file=sys.stderr, dynamic_ncols=True) as bar:
            shards = write_shards(tmp, staged, opts.shard_size, with_gt, progress=bar, identity=identity)
        shutil.rmtree(os.path.join(ds_dir, "shards"), ignore_errors=True)
        os.replace(tmp, os.path.join(ds_dir, "shards"))
    except FileWriteError as e:  # names the shard or .idx that could not be written
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError(str(e)) from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError(write_failure(tmp, e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    checksums = {}
    for name in shards:
        for f in (name, name[:-4] + ".idx"):
            checksums[f"shards/{f}"] = file_sha256(os.path.join(ds_dir, "shards", f))
    return shards, checksums


def _manifest(spec: SourceSpec, opts: BuildOptions, formats: Sequence[str], masks_note: str, cam_info,
              survey: _Survey, shards: List[str], checksums: dict, stage_seconds: float, ds_dir: str,
              identity: str) -> dict:
    """The dataset's manifest.json (README "Building datasets")."""
    # Loaders compare these with the files before reading (cheaper than the checksums).
    sizes = {f: os.path.getsize(os.path.join(ds_dir, f)) for f in checksums}
    return {
        "kind": "dataset",
        "schema_version": SCHEMA_VERSION,
        # Carried by data.beton, every tar and every .idx; the loaders compare them at open.
        "dataset_id": identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"path": os.path.abspath(spec.path), "kind": spec.kind, "gt_masks": spec.gt_mask_root},
        "options": opts.to_dict(),
        "masks": masks_note,
        "contracam": cam_info,
        "formats": list(formats),
        "classes": spec.classes,
        "has_gt": survey.with_gt,
        "counts": {"inputs": len(spec.samples), "records": len(survey.index), "skipped": len(survey.skipped),
                   "records_without_boxes": sum(1 for n in survey.n_boxes if n == 0),
                   "records_without_background": survey.without_bg,
                   # Boxes beyond --max-boxes, the smallest of their record (process._boxes_from).
                   "boxes_dropped": sum(survey.boxes_dropped),
                   "records_with_boxes_dropped": sum(1 for n in survey.boxes_dropped if n),
                   "gt_boxes_dropped": sum(survey.gt_boxes_dropped)},
        "conversions": dict(survey.notes),
        "skipped": survey.skipped,
        "shards": [f"shards/{n}" for n in shards],
        "checksums": checksums,
        "sizes": sizes,
        "timing": {"records_seconds": round(stage_seconds, 3)},
        "records": {"keys": survey.keys, "digests": survey.digests(), "labels": survey.labels,
                    "n_boxes": survey.n_boxes, "boxes_dropped": survey.boxes_dropped},
    }


def _area(r) -> float:
    return float(max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1]))


def _remove_leftover(path: str, log: Callable) -> None:
    """Remove a directory the finished build no longer needs; failing to costs only disk space,
    so it is a warning, not a failed build."""
    try:
        shutil.rmtree(path)
    except OSError as e:
        log(f"warning: could not remove {path} ({e}); delete it by hand")


# Descriptors of the OUT locks this process holds. A forked child (the record pool, ffcv's writer
# processes) closes its copies at once: the lock lives as long as any copy is open, and a child
# left behind by a killed build would otherwise keep OUT locked.
_HELD_LOCKS: set = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def _exclusive_output(out: str):
    """Hold an exclusive lock on OUT.lock for the whole build, so that a second build into the
    same OUT is refused instead of writing into the same OUT.partial. flock, not a pid file: the
    kernel releases it when its holder dies, so a killed build never blocks the next one."""
    path = out + ".lock"
    while True:
        try:
            os.makedirs(os.path.dirname(out), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:  # the first write beside OUT: a read-only or missing parent shows here
            raise BuildError(f"cannot write beside {out}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BuildError(f"another objloader-build is writing {out} (pid {holder}); "
                             "wait for it to finish or stop it") from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # locked a file its last holder removed on release: lock the file now at path
    _HELD_LOCKS.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # Removed while still locked; a build waiting on this file sees it gone and takes a new one.
        with contextlib.suppress(OSError):
            os.remove(path)
        _HELD_LOCKS.discard(fd)
        os.close(fd)


def _check_output(out: str, overwrite: bool) -> None:
    """Refuse, before any work, an OUT the finished build could not be put in place of."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise BuildError(f"{out} exists and is not a directory; remove it or choose another OUT")
    if os.path.exists(out):
        if not overwrite:
            raise BuildError(f"{out} already exists; pass --overwrite to replace it")
        # Even root is refused an immutable directory or a read-only filesystem, and os.access
        # says so; found only at the final rename, it would cost the whole build.
        if not os.access(out, os.W_OK):
            raise BuildError(f"{out} cannot be replaced: it is read-only or immutable")


def _publish(partial: str, out: str, log: Callable) -> None:
    """Make the complete build appear as OUT in one rename. An old OUT (--overwrite) is moved
    aside first and removed last, so failing to remove it only leaves it behind."""
    old = f"{out}.old-{os.getpid()}" if os.path.exists(out) else None
    try:
        if old:
            os.rename(out, old)
        os.rename(partial, out)
    except OSError as e:
        kept = ""
        if old and os.path.exists(old) and not os.path.lexists(out):
            try:
                os.rename(old, out)
            except OSError:
                kept = f"; the previous {out} is now {old}"
        raise BuildError(f"the build is complete in {partial} but could not be moved to {out}: {e}{kept}") from None
    if old:
        _remove_leftover(old, log)


def _check_apart(src: str, out: str) -> None:
    """Refuse an OUT inside a source folder (a rebuild would read the output as input: a new
    class folder, shifting every label after it) and a SRC inside OUT (--overwrite would delete
    it). Links are resolved: a link cannot hide either."""
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    if os.path.isdir(src) and os.path.commonpath([real_src, real_out]) == real_src:
        raise BuildError(f"OUT {out} lies inside the source folder {src}: the next build would read the output as "
                         "input (a new class folder, shifting the labels after it); choose an OUT outside SRC")
    if os.path.commonpath([real_src, real_out]) == real_out:
        raise BuildError(f"SRC {src} lies inside OUT {out}: replacing OUT would delete the source; "
                         "choose an OUT outside SRC")


def build(src: str, out: str, opts: BuildOptions = BuildOptions(), *, formats: Sequence[str] = FORMATS,
          workers: Optional[int] = None, on_error: str = "skip", overwrite: bool = False,
          coco_images: Optional[str] = None, gt_masks: Optional[str] = None,
          contracam: Optional[MaskProvider] = None, follow_links: bool = False, log: Callable = print,
          coco_allow_outside: bool = False) -> dict:
    """Build src into out; returns the top-level manifest. ``coco_images``, ``gt_masks`` (a
    parallel tree of ground-truth masks), ``follow_links`` (read links and list-file paths
    leading outside SRC) and ``coco_allow_outside`` are passed to sources.open_source (a refused
    COCO file is a skip whose path is the json, so the source's fingerprint, which stats each
    sample's path, differs with the flag). ``--masks contracam`` needs ``contracam``, a
    MaskProvider (objloader.cam.masks.ContraCAMMasks)."""
    formats = tuple(formats)
    if not formats:
        raise BuildError(f"no output format given; choose one or more of {', '.join(FORMATS)} (--formats ffcv,wds)")
    for f in formats:
        if f not in FORMATS:
            raise BuildError(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
    if "ffcv" in formats:  # refused before any record is read, naming the extra to install
        require("ffcv", "objloader-build --formats ffcv (data.beton); build --formats wds without it")
    if on_error not in ("skip", "fail"):
        raise BuildError(f"--on-error must be skip or fail, not {on_error!r}")
    if opts.masks not in ("gt", "none", "contracam"):
        raise BuildError(f"--masks {opts.masks!r} is not available; choose gt, none or contracam")
    if opts.masks == "contracam":
        if contracam is None:
            raise BuildError("--masks contracam needs either --checkpoint CKPT (run ContraCAM now) or "
                             "--cam-masks DIR (the output of objloader-cam)")
        contracam.validate()
    elif contracam is not None:
        raise BuildError(f"--checkpoint / --cam-masks only apply to --masks contracam, not --masks {opts.masks}")
    out = os.path.abspath(out.rstrip("/"))
    if os.path.exists(src):  # a missing SRC is open_source's to name
        _check_apart(src, out)
    with _exclusive_output(out):
        _check_output(out, overwrite)  # under the lock: a build that just finished may have made OUT
        specs = open_source(src, coco_images, gt_masks, coco_allow_outside=coco_allow_outside,
                            follow_links=follow_links)
        identity = contracam.identity() if contracam else None
        if follow_links:  # changes the records though no file changes: a resumed build must know
            identity = {"mask run": identity, "follow_links": True}
        return _build_locked(specs, src, out, opts, formats, workers, on_error, contracam, identity, log)


def _build_locked(specs: List[SourceSpec], src: str, out: str, opts: BuildOptions, formats: Sequence[str],
                  workers: Optional[int], on_error: str, contracam: Optional[MaskProvider], identity,
                  log: Callable) -> dict:
    """build() once its arguments are checked, OUT is locked and the source is open.
    ``identity``: what the fingerprint knows beyond options and source (the mask run, links)."""
    workers = workers or os.cpu_count() or 1
    partial = out + ".partial"
    fingerprint = _fingerprint(specs, opts, formats, identity)
    state_path = os.path.join(partial, STATE)
    try:
        if os.path.isdir(partial):
            try:
                with open(state_path) as f:
                    same = json.load(f).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                same = False
            if same:
                log(f"resuming the interrupted build in {partial}")
            else:
                log(f"{partial} is from a different or unreadable build: starting over")
                shutil.rmtree(partial)
        os.makedirs(partial, exist_ok=True)
        write_json_atomic(state_path, {"fingerprint": fingerprint, "source": os.path.abspath(src)})
    except OSError as e:
        raise BuildError(f"cannot prepare {partial}: {e}") from None

    t0 = time.time()
    ctx = mp.get_context("fork")
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        manifests = {}
        for spec in specs:
            ds_dir = os.path.join(partial, spec.name) if spec.name else partial
            os.makedirs(ds_dir, exist_ok=True)
            manifests[spec.name] = _build_one(spec, ds_dir, opts, formats, pool, workers, on_error, log, contracam)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.time() - t0
    if len(specs) == 1 and specs[0].name == "":
        top = manifests[""]
    else:
        top = {
            "kind": "collection",
            "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": {"path": os.path.abspath(src), "kinds": sorted({s.kind for s in specs})},
            "datasets": {name: {"records": m["counts"]["records"], "skipped": m["counts"]["skipped"],
                                "boxes_dropped": m["counts"].get("boxes_dropped", 0)}
                         for name, m in manifests.items()},
        }
    top["build_seconds"] = round(seconds, 3)
    top["workers"] = workers
    write_json_atomic(os.path.join(partial, MANIFEST_FILE), top)
    os.remove(state_path)
    _publish(partial, out, log)  # an old output is replaced only now
    return top
