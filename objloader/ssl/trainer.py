"""One training loop for MoCo v2 and BYOL on any engine, single process or DDP under torchrun.

``train(TrainConfig(...))`` runs the loop; the commands (objloader/cli/train.py: objloader-train-moco,
train/moco.py, ...) map their flags 1:1 onto :class:`TrainConfig`; what differs between the
methods (model, colour preset, crop scale, base lr, EMA, head) is their recipe in
:mod:`objloader.ssl.methods`. Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) it joins the
process group (:mod:`objloader.runtime`: gloo on CPU, nccl on CUDA), shards the data by rank and
wraps the model in DistributedDataParallel; rank 0 logs and writes checkpoints.

Read top-down: the config, the setup of a run (device and process group, data, model and
optimizer), :func:`train` and its steps (resume, one optimisation step, the epoch loop, the end
of a run). Checkpoints, metrics and the loss curve are written by
:mod:`objloader.ssl.run_io` (checkpoint layout there).
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..loaders import make_loader
from ..store.reader import read_manifest
from ..checkpoint import ARCHS, DEFAULT_WIDTH, CheckpointError, load_backbone
from .knn import KnnMonitor, default_val_dir
from .methods import METHODS, RECIPES, recipe
from .moco import DEFAULT_BN_SPLITS
from .run_io import RunLogger, load_checkpoint, plot_loss, save_checkpoint, set_rng_state
from ..errors import ConfigError, DivergedError
from ..runtime import (DEFAULT_DIST_TIMEOUT, Ranks, barrier, choose_device, join_process_group,
                       leave_process_group, raise_if_dist_failed, ranks)
from ..augment.params import check_crop_scale
from ..ranges import DIST_TIMEOUT, IMAGE_SIZE, SEED, WORKERS, Range, check_device, check_ranges

# each bound of TrainConfig.crop_scale (and of --crop-scale): an area fraction
CROP_SCALE = Range(float, 0, 1, lo_open=True, why="a fraction of the image's area, each of min and max")

__all__ = ["TrainConfig", "train", "METHODS", "load_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Every flag of train/moco.py and train/byol.py, with the defaults of the scripts."""

    method: str = "moco"
    loader: str = "dali"
    data: Optional[str] = None  # a built dataset dir (required; the commands default it to the demo's)
    oa_crop: bool = False
    bg_mixup: float = 0.0
    bg_mode: str = "soft"
    # RandomResizedCrop (min, max) area of the views; None = the method's recipe (MoCo v2 (0.2, 1),
    # BYOL (0.08, 1)), resolved when the config is made, so checkpoints record the scale used
    crop_scale: Optional[Tuple[float, float]] = None
    arch: str = "resnet18"
    small_stem: bool = False
    width: int = DEFAULT_WIDTH  # base channels of the ResNet (64 = torchvision)
    image_size: int = 64
    epochs: int = 2
    batch_size: int = 128  # per rank
    lr: Optional[float] = None  # base lr per 256 images; None = the method's recipe (ssl/methods.py)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    amp: bool = False
    channels_last: bool = False  # NHWC weights and activations (faster convolutions with --amp on CUDA)
    out: str = "runs/moco"
    resume: Optional[str] = None  # "" = OUT/checkpoint.pt, else a checkpoint path
    init: Optional[str] = None  # start the backbone from this checkpoint (any format load_backbone reads)
    seed: int = 0
    workers: Optional[int] = None
    save_every: int = 50
    log_every: int = 5
    max_steps: Optional[int] = None  # stop (and save) after this many steps; the schedule still spans --epochs
    queue_size: int = 65536  # MoCo; scaled down for small datasets
    temperature: float = 0.2  # MoCo
    bg_negatives: bool = False  # MoCo: each sample's background-only image as extra negatives (after CLAD)
    shuffle_bn: bool = True  # MoCo: Shuffle-BN (split BN + shuffle in one process, cross-rank shuffle under DDP)
    ema: Optional[float] = None  # momentum of the key / target network; None = the recipe's (0.999 MoCo, 0.996 BYOL)
    device: Optional[str] = None  # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    dist_timeout: float = DEFAULT_DIST_TIMEOUT  # seconds a rank waits in a collective for the others (torchrun)
    # online kNN monitor (ssl/knn.py): every knn_every epochs (0: off), when a labelled val split
    # is found (knn_val, or the ``val`` split beside ``data``); a bank of knn_bank train records
    knn_every: int = 2  # one evaluation (bank 500) costs ~7 % of an epoch at the demo recipe: every other one, 3.7 % (benchmarks/results/knn_cost.md)
    knn_bank: int = 500
    knn_val: Optional[str] = None
    progress: bool = True

    # The allowed value of every numeric field, which its flag shares (objloader/ranges.py).
    RANGES: ClassVar[dict] = {
        "bg_mixup": Range(float, 0, 1, why="a probability"),
        "width": Range(int, 1, 1024, why="base channels; 64 = torchvision"),
        "image_size": IMAGE_SIZE,
        "epochs": Range(int, 1, 100_000),
        "batch_size": Range(int, 1, 65_536),
        "lr": Range(float, 0, 10, lo_open=True, why="base lr per 256 images"),
        "momentum": Range(float, 0, 1, hi_open=True),
        "weight_decay": Range(float, 0, 1),
        "seed": SEED,
        "workers": WORKERS,
        "save_every": Range(int, 0, 10 ** 9, why="0: only at the end"),
        "log_every": Range(int, 1, 10 ** 9),
        "max_steps": Range(int, 1, 10 ** 12),
        "queue_size": Range(int, 1, 2 ** 20, why="keys of 128 floats: 2**20 is 512 MiB"),
        "temperature": Range(float, 0, 10, lo_open=True),
        "ema": Range(float, 0, 1, why="momentum of an average"),
        "dist_timeout": DIST_TIMEOUT,
        "knn_every": Range(int, 0, 10 ** 6, why="epochs; 0: off"),
        "knn_bank": Range(int, 1, 10 ** 7, why="train records in the kNN bank"),
    }
    # (crop_scale is a pair, checked by make_loader's check_crop_scale in __post_init__; each bound of
    # its flag has the range CROP_SCALE)

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"TrainConfig: {msg}")

        if self.method not in RECIPES:
            bad(f"method must be one of {', '.join(RECIPES)}, got {self.method!r}")
        if self.bg_negatives and self.method != "moco":
            bad(f"bg_negatives (background negatives) is a MoCo option; {self.method} has no negatives")
        if self.arch not in ARCHS:
            bad(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        check_ranges(self, self.RANGES, "TrainConfig")
        try:  # make_loader's own rule: 0 < min <= max <= 1 (each bound is CROP_SCALE, the flag's range)
            scale = check_crop_scale(recipe(self.method).crop_scale if self.crop_scale is None else self.crop_scale)
        except ConfigError as e:
            bad(str(e))
        object.__setattr__(self, "crop_scale", scale)  # frozen: the resolved scale, once
        try:
            check_device(self.device)
        except ConfigError as e:
            bad(str(e))

    @property
    def base_lr(self) -> float:
        return recipe(self.method).base_lr if self.lr is None else float(self.lr)


# ---------------------------------------------------------------------------------------------
# data


def _dataset_size(path: str) -> int:
    m = read_manifest(path)
    try:
        return int(m["counts"]["records"])
    except (KeyError, TypeError):
        return len(m["records"]["labels"])


def _build_loader(cfg: TrainConfig, d: Ranks, device: torch.device):
    r = recipe(cfg.method)
    return make_loader(cfg.data, cfg.loader, batch_size=cfg.batch_size, image_size=cfg.image_size,
                       oa_crop=cfg.oa_crop, crop_scale=cfg.crop_scale, bg_mixup=cfg.bg_mixup, bg_mode=cfg.bg_mode,
                       color=r.colour, device=device, seed=cfg.seed,
                       num_workers=cfg.workers, rank=d.rank, world_size=d.world_size,
                       return_backgrounds=cfg.bg_negatives)


# ---------------------------------------------------------------------------------------------
# model and schedule


def _build_model(cfg: TrainConfig, n_records: int, world_size: int = 1) -> torch.nn.Module:
    return recipe(cfg.method).build(cfg, n_records, world_size)


def _lr_at(peak: float, step: int, total: int) -> float:
    """Cosine decay per step from the peak to 0 (no warm-up, as MoCo v2's code)."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


# ---------------------------------------------------------------------------------------------
# a run: everything the steps of train() share


@dataclass
class _Run:
    cfg: TrainConfig  # with ``data`` resolved
    device: torch.device
    d: Ranks
    log: Callable  # print on rank 0, silent elsewhere
    loader: object  # make_loader's loader for this rank's shard
    steps_per_epoch: int
    total: int  # steps the schedule spans (cfg.epochs epochs)
    stop: int  # steps this run trains to (total, or cfg.max_steps when lower)
    model: torch.nn.Module  # MoCo or BYOL: what checkpoints hold
    ddp_model: torch.nn.Module  # the model, wrapped in DDP under torchrun: what the steps call
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]  # --amp on CUDA only
    amp_dtype: torch.dtype
    peak_lr: float
    global_batch: int
    ckpt_path: str
    saved_step: Optional[int] = None  # the step of the checkpoint at ckpt_path this run wrote or resumed
    owns_group: bool = False  # this run joined the process group, so it leaves it at the end
    knn: Optional[KnnMonitor] = None  # the online kNN monitor, when on


def _knn_monitor(cfg: TrainConfig, d: Ranks, device: torch.device, log: Callable) -> Optional[KnnMonitor]:
    """The kNN monitor of this run, or None: off (--knn-every 0), or no labelled val split."""
    if not cfg.knn_every:
        return None
    val = cfg.knn_val or default_val_dir(cfg.data)
    if val is None:
        log("kNN monitor off: no labelled val split beside the data (pass --knn-val DIR)")
        return None
    log(f"kNN monitor every {cfg.knn_every} epoch(s): bank {cfg.knn_bank} records of {cfg.data}, queries {val}")
    return KnnMonitor(cfg.data, val, cfg.image_size, bank_size=cfg.knn_bank, device=str(device),
                      rank=d.rank, world=d.world_size)


def _setup(cfg: TrainConfig) -> _Run:
    """Device and process group, data, then model and optimizer, in this order: every rank seeds
    its RNGs before the loader and the model are built, so all start from the same weights (and
    queue). The model is not yet wrapped in DDP (see _wrap_ddp)."""
    d = ranks()
    device = choose_device(cfg.device, d)
    owns_group = join_process_group(device, cfg.dist_timeout, d)  # also makes a CUDA device current
    log = print if d.main else (lambda *a, **k: None)
    if cfg.data is None:
        raise ConfigError("TrainConfig.data is required: a built dataset directory (the training commands "
                          "default it to the demo data)")

    torch.manual_seed(cfg.seed)  # same initial weights (and queue) on every rank
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    loader = _build_loader(cfg, d, device)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg.data!r}: fewer records per rank than --batch-size {cfg.batch_size}; "
                         f"lower the batch size")
    total = cfg.epochs * steps_per_epoch
    model = _build_model(cfg, _dataset_size(cfg.data), d.world_size).to(device)
    if cfg.channels_last:  # the convolutions then run NHWC, converting their NCHW inputs once
        model = model.to(memory_format=torch.channels_last)
    global_batch = cfg.batch_size * d.world_size
    peak_lr = cfg.base_lr * global_batch / 256
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=peak_lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    use_scaler = cfg.amp and device.type == "cuda"
    knn = _knn_monitor(cfg, d, device, log)
    return _Run(knn=knn, cfg=cfg, device=device, d=d, log=log, loader=loader, steps_per_epoch=steps_per_epoch,
                total=total, stop=total if cfg.max_steps is None else min(cfg.max_steps, total),
                model=model, ddp_model=model, optimizer=optimizer,
                scaler=torch.amp.GradScaler("cuda") if use_scaler else None,
                amp_dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                peak_lr=peak_lr, global_batch=global_batch, ckpt_path=os.path.join(cfg.out, CHECKPOINT_NAME),
                owns_group=owns_group)


def _wrap_ddp(run: _Run) -> None:
    """Under torchrun, wrap the model in DistributedDataParallel (after a resume has loaded its
    weights). Buffers stay per rank: the queue is identical by construction (keys are
    all-gathered)."""
    if run.d.distributed:
        run.ddp_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            broadcast_buffers=False)


def _announce(run: _Run) -> None:
    """The run's one-line summary (rank 0)."""
    cfg, d = run.cfg, run.d
    if not d.main:
        return
    moco = ""
    if cfg.method == "moco":
        shuffle = ("off" if not cfg.shuffle_bn else "across ranks" if d.distributed
                   else f"split BN into up to {DEFAULT_BN_SPLITS} groups")
        moco = f", queue {run.model.queue.shape[0]}, Shuffle-BN {shuffle}"
    run.log(f"{cfg.method} on {cfg.loader}: {cfg.data}, {run.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
            f"global batch {run.global_batch}, peak lr {run.peak_lr:.4g}, {d.world_size} process(es) on "
            f"{run.device}{moco}")


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, on_batch: Optional[Callable] = None) -> dict:
    """Train; returns {"step", "epoch", "loss" (the last step's), "checkpoint", "seconds", "model"}.

    ``on_batch(step, batch)`` (optional) sees every batch this rank trains on (tests use it to
    check the shards).
    """
    run = _setup(cfg)
    try:
        step = _resume(run) if run.cfg.resume is not None else _init_backbone(run)
        _wrap_ddp(run)
        logger = RunLogger(run.cfg, run.stop, step, run.d.main)
        _announce(run)

        t_start = time.perf_counter()
        step, loss_val = _train_until_stop(run, step, logger, on_batch)
        seconds = time.perf_counter() - t_start
        _finish(run, logger, step, loss_val, seconds)
    except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors
        raise_if_dist_failed(run.d, cfg.dist_timeout, e)
        raise
    return {"step": step, "epoch": step // run.steps_per_epoch, "loss": loss_val, "checkpoint": run.ckpt_path,
            "seconds": seconds, "model": run.model}


def _resume(run: _Run) -> int:
    """Load the checkpoint named by --resume into the model, optimizer, scaler and RNGs; returns
    the step to continue from."""
    cfg = run.cfg
    src = cfg.resume or run.ckpt_path
    ckpt = load_checkpoint(src, cfg)
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.scaler is not None and ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{src!r} does not fit this run's model/optimizer "
                              f"(another --queue-size, --batch-size or dataset?): {e}") from e
    set_rng_state(ckpt["rng"])
    step = int(ckpt["step"])
    if os.path.abspath(src) == os.path.abspath(run.ckpt_path):
        run.saved_step = step
    old = ckpt["config"]
    if old.get("batch_size") != cfg.batch_size or old.get("data") != cfg.data:
        warnings.warn(f"resuming {src!r} written with batch_size={old.get('batch_size')}, "
                      f"data={old.get('data')!r}; the step position may not match this run")
    run.log(f"resumed from {src} at step {step} (epoch {step // run.steps_per_epoch})"
            + (f"; --init {cfg.init} not applied (the checkpoint holds the trained weights)" if cfg.init else ""))
    return step


# the momentum copy of the backbone each method keeps (MoCo's key encoder, BYOL's target)
_MOMENTUM_BACKBONE = {"moco": "key_backbone", "byol": "target_backbone"}


def _init_backbone(run: _Run) -> int:
    """--init: the backbone (and its momentum copy) start from a pretrained encoder; heads,
    queue and optimizer start fresh. Returns step 0. A resumed run never reaches this: its
    checkpoint already holds the trained weights."""
    cfg = run.cfg
    if not cfg.init:
        return 0
    net, meta = load_backbone(cfg.init)
    for key in ("arch", "small_stem", "width"):
        if meta[key] != getattr(cfg, key):
            raise CheckpointError(f"--init {cfg.init!r} holds a {meta['arch']} (small_stem={meta['small_stem']}, "
                                  f"width={meta['width']}), but this run has {key}={getattr(cfg, key)!r}; "
                                  f"pass --{key.replace('_', '-')} to match it")
    state = net.state_dict()
    run.model.backbone.load_state_dict(state)
    getattr(run.model, _MOMENTUM_BACKBONE[cfg.method]).load_state_dict(state)
    run.log(f"initialised the backbone from {cfg.init} ({meta['source_format']} {meta['arch']}); "
            "heads, queue and optimizer start fresh")
    return 0


def _train_step(run: _Run, batch, step: int) -> float:
    """One optimisation step on ``batch`` as step ``step`` of the schedule (cosine lr, then the
    momentum encoder / target network follows with step + 1); returns the loss."""
    optimizer, scaler = run.optimizer, run.scaler
    for g in optimizer.param_groups:
        g["lr"] = _lr_at(run.peak_lr, step, run.total)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.cfg.amp):
        if run.cfg.bg_negatives:
            loss = run.ddp_model(batch.views, batch.backgrounds, batch.has_bg)
        else:
            loss = run.ddp_model(batch.views)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    run.model.momentum_update((step + 1) / run.total)
    return float(loss.detach())


class _Window:
    """Metrics averaged over the steps since the last metrics line."""

    def __init__(self):
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.t, self.wait, self.imgs, self.loss, self.n = now, 0.0, 0, 0.0, 0

    def add(self, loss: float, images: int) -> None:
        self.loss += loss
        self.n += 1
        self.imgs += images


def _train_until_stop(run: _Run, step: int, logger: RunLogger, on_batch: Optional[Callable]):
    """Epochs from ``step`` until run.stop: a resumed run first skips the batches of its epoch
    that the checkpoint already trained on. Returns (step reached, the last step's loss)."""
    run.model.train()
    loss_val = float("nan")
    window = _Window()
    while step < run.stop:
        epoch = step // run.steps_per_epoch
        run.loader.set_epoch(epoch)
        skip = step - epoch * run.steps_per_epoch  # batches of this epoch done before the checkpoint
        it = iter(run.loader)
        t_wait = time.perf_counter()
        for i, batch in enumerate(it):
            if i < skip:
                t_wait = time.perf_counter()
                continue
            window.wait += time.perf_counter() - t_wait
            if on_batch is not None:
                on_batch(step, batch)
            loss_val = _train_step(run, batch, step)
            step += 1
            window.add(loss_val, len(batch.views) * run.d.world_size)
            logger.step()
            _check_finite(run, step, loss_val)
            _log_and_save(run, logger, window, step, epoch)
            if run.knn is not None and step % run.steps_per_epoch == 0 and (step // run.steps_per_epoch) % run.cfg.knn_every == 0:
                _log_knn(run, logger, step, window)
            if step >= run.stop:
                break
            t_wait = time.perf_counter()
        del it  # closes the engine's epoch iterator when we stop mid-epoch
    return step, loss_val


def _log_knn(run: _Run, logger: RunLogger, step: int, window: _Window) -> None:
    """kNN top-1 after the epoch that ends at ``step`` (every rank extracts its share), logged by
    rank 0; its time is left out of the next metrics line's images/s."""
    t = time.perf_counter()
    if run.d.distributed:
        # BatchNorm's running statistics differ between ranks (each saw its own shard); every
        # rank extracts its share of the features with rank 0's, the ones checkpoints hold.
        # Harmless to training, which normalises with each batch's own statistics.
        for buf in run.model.backbone.buffers():
            dist.broadcast(buf, src=0)
    top1 = run.knn(run.model.backbone)
    seconds = time.perf_counter() - t
    logger.log_eval({"step": step, "epoch": step // run.steps_per_epoch, "knn_top1": top1, "knn_seconds": seconds})
    window.t += seconds


def _saves_at(run: _Run, step: int) -> bool:
    """Whether a checkpoint is written after step ``step`` (every --save-every steps, and the end)."""
    return step == run.stop or bool(run.cfg.save_every and step % run.cfg.save_every == 0)


def _state_is_finite(run: _Run) -> bool:
    tensors = list(run.model.state_dict().values())
    tensors += [t for s in run.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _check_finite(run: _Run, step: int, loss_val: float) -> None:
    """Stop with DivergedError when the loss of step ``step`` on any rank, or (before a checkpoint)
    the model or optimizer state, is not finite, so a diverged state never overwrites a good
    checkpoint. Under DDP the ranks agree (one all-gather of two numbers), so all stop together
    instead of one leaving the others waiting in their next all-reduce."""
    bad_state = _saves_at(run, step) and not _state_is_finite(run)
    mine = torch.tensor([loss_val, float(bad_state)], dtype=torch.float64, device=run.device)
    if run.d.distributed:
        every = [torch.empty_like(mine) for _ in range(run.d.world_size)]
        dist.all_gather(every, mine)
    else:
        every = [mine]
    every = [(float(t[0]), bool(t[1])) for t in every]
    bad = [r for r, (loss, state) in enumerate(every) if state or not math.isfinite(loss)]
    if not bad:
        return
    cfg = run.cfg
    where = "" if not run.d.distributed else f" on rank {', '.join(map(str, bad))} of {run.d.world_size}"
    loss, state = every[bad[0]]
    what = f"loss {loss}" if not math.isfinite(loss) else f"loss {loss:.4g} but the model/optimizer state is not finite"
    settings = (f"lr {cfg.base_lr:g} per 256 images (peak {run.peak_lr:.3g}, {run.optimizer.param_groups[0]['lr']:.3g} "
                f"at this step), batch_size {cfg.batch_size}" + (f", temperature {cfg.temperature:g}" if cfg.method == "moco" else "")
                + (", amp" if cfg.amp else ""))
    kept = (f"the last good checkpoint {run.ckpt_path} (step {run.saved_step}) is kept" if run.saved_step is not None
            else "no checkpoint of this run had been written")
    advice = "lower --lr" + (" or raise --temperature" if cfg.method == "moco" else "") + (" or drop --amp" if cfg.amp else "")
    raise DivergedError(f"training diverged at step {step}{where}: {what}, with {settings}; {kept}; {advice}")


def _log_and_save(run: _Run, logger: RunLogger, window: _Window, step: int, epoch: int) -> None:
    """After step ``step`` (counted from 1): a metrics line every --log-every steps and at the
    end, a checkpoint every --save-every steps before the end (rank 0; _finish writes the last)."""
    cfg = run.cfg
    if step % cfg.log_every == 0 or step == run.stop:
        now = time.perf_counter()
        span = max(now - window.t, 1e-9)
        logger.log({"step": step, "epoch": epoch, "loss": window.loss / window.n,
                    "lr": run.optimizer.param_groups[0]["lr"], "img_per_s": window.imgs / span,
                    "data_wait": window.wait / span})
        window.reset(now)
    if cfg.save_every and step % cfg.save_every == 0 and step < run.stop:
        if run.d.main:
            save_checkpoint(run.ckpt_path, cfg, run.model, run.optimizer, run.scaler, step, step // run.steps_per_epoch)
        run.saved_step = step


def _finish(run: _Run, logger: RunLogger, step: int, loss_val: float, seconds: float) -> None:
    """The final checkpoint, metrics and loss curve (rank 0), then every rank leaves together."""
    cfg, d = run.cfg, run.d
    if d.main:
        save_checkpoint(run.ckpt_path, cfg, run.model, run.optimizer, run.scaler, step, step // run.steps_per_epoch)
    run.saved_step = step
    logger.close()
    if d.main:
        try:
            plot_loss(logger.metrics_path, os.path.join(cfg.out, "loss.png"),
                      f"{cfg.method} / {cfg.loader} / {cfg.arch}")
        except Exception as e:  # the plot is a convenience; the run itself succeeded
            warnings.warn(f"loss curve not written: {e}")
        run.log(f"done: {step} steps in {seconds:.1f} s, final loss {loss_val:.4f}; "
                f"{run.ckpt_path}, {logger.metrics_path}, {os.path.join(cfg.out, 'loss.png')}")
    barrier()
    leave_process_group(run.owns_group)
