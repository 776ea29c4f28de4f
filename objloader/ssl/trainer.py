"""One training loop for MoCo v2 and BYOL on any engine, single process or DDP under torchrun.

``train(TrainConfig(...))`` runs the loop; ``train/moco.py`` and ``train/byol.py`` map their flags
1:1 onto :class:`TrainConfig`. Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) it joins the
process group (gloo on CPU, nccl on CUDA), shards the data by rank and wraps the model in
DistributedDataParallel; rank 0 logs and writes checkpoints.

Checkpoint (``OUT/checkpoint.pt``, written atomically): the backbone contract of
:mod:`objloader.checkpoint` plus ``model`` (momentum encoder, queue), ``optimizer``, ``scaler``,
``step``, ``epoch``, ``config`` and ``rng``, all tensors or plain types, so
``torch.load(path, weights_only=True)`` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..loaders import make_loader
from ..store.reader import read_manifest
from ..checkpoint import ARCHS, CHECKPOINT_FORMAT, DEFAULT_WIDTH, CheckpointError, checkpoint_width
from .byol import BYOL
from .moco import DEFAULT_BN_SPLITS, MoCo, queue_size_for
from ..errors import ConfigError

__all__ = ["TrainConfig", "train", "METHODS", "DEFAULT_BASE_LR", "demo_train_path", "load_checkpoint"]

METHODS = ("moco", "byol")
# lr = base * global batch / 256 (Goyal et al. linear scaling). MoCo v2: 0.03 (its public code).
# BYOL: the paper uses LARS at 0.2; we keep plain SGD (momentum 0.9, wd 1e-4) at 0.05 for simplicity.
DEFAULT_BASE_LR = {"moco": 0.03, "byol": 0.05}
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Every flag of train/moco.py and train/byol.py, with the defaults of the scripts."""

    method: str = "moco"
    loader: str = "dali"
    data: Optional[str] = None  # a built dataset dir; None = the demo's built/train (made on first use)
    oa_crop: bool = False
    bg_mixup: float = 0.0
    bg_mode: str = "soft"
    arch: str = "resnet18"
    small_stem: bool = False
    width: int = DEFAULT_WIDTH  # base channels of the ResNet (64 = torchvision)
    image_size: int = 64
    epochs: int = 2
    batch_size: int = 128  # per rank
    lr: Optional[float] = None  # base lr per 256 images; None = DEFAULT_BASE_LR[method]
    momentum: float = 0.9
    weight_decay: float = 1e-4
    amp: bool = False
    channels_last: bool = False  # NHWC weights and activations (faster convolutions with --amp on CUDA)
    out: str = "runs/moco"
    resume: Optional[str] = None  # "" = OUT/checkpoint.pt, else a checkpoint path
    seed: int = 0
    workers: Optional[int] = None
    save_every: int = 50
    log_every: int = 5
    max_steps: Optional[int] = None  # stop (and save) after this many steps; the schedule still spans --epochs
    queue_size: int = 65536  # MoCo; scaled down for small datasets
    temperature: float = 0.2  # MoCo
    shuffle_bn: bool = True  # MoCo: Shuffle-BN (split BN + shuffle in one process, cross-rank shuffle under DDP)
    ema: Optional[float] = None  # momentum of the key / target network; None = 0.999 MoCo, 0.996 BYOL
    device: Optional[str] = None  # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    progress: bool = True

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"TrainConfig: {msg}")

        if self.method not in METHODS:
            bad(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.arch not in ARCHS:
            bad(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name in ("epochs", "batch_size", "log_every", "width"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0:
            bad(f"save_every must be >= 0 (0: only at the end), got {self.save_every}")
        if self.max_steps is not None and self.max_steps < 1:
            bad(f"max_steps must be >= 1, got {self.max_steps}")

    @property
    def base_lr(self) -> float:
        return DEFAULT_BASE_LR[self.method] if self.lr is None else float(self.lr)


# ---------------------------------------------------------------------------------------------
# distributed setup


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = _Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if d.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        d.owns_group = True
    return d


def _pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device is not None:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _barrier(d: _Dist) -> None:
    if d.enabled:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# data


def demo_train_path(root: Optional[str] = None, log: Callable = print) -> str:
    """``ROOT/demo/built/train``, generated (objloader-demo) and built (objloader-build --masks gt)
    first when it does not exist, as ``make demo`` does. ROOT defaults to the current directory
    (never the package's own folder: an installed package lives in site-packages)."""
    from ..sources.demo import generate_demo
    from ..store import BuildOptions, build

    root = os.path.abspath(root or os.getcwd())
    data, built = os.path.join(root, "demo", "data"), os.path.join(root, "demo", "built")
    train = os.path.join(built, "train")
    if os.path.isfile(os.path.join(train, "manifest.json")):
        return train
    if not os.path.isfile(os.path.join(data, "demo.json")):
        log(f"generating the demo data in {data} (first use; takes a few minutes)")
        generate_demo(data, overwrite=True)
    log(f"building {built} from {data}")
    build(data, built, BuildOptions(masks="gt"), overwrite=True)
    return train


def _dataset_size(path: str) -> int:
    m = read_manifest(path)
    try:
        return int(m["counts"]["records"])
    except (KeyError, TypeError):
        return len(m["records"]["labels"])


def _build_loader(cfg: TrainConfig, d: _Dist, device: torch.device):
    return make_loader(cfg.data, cfg.loader, batch_size=cfg.batch_size, image_size=cfg.image_size,
                       oa_crop=cfg.oa_crop, bg_mixup=cfg.bg_mixup, bg_mode=cfg.bg_mode,
                       color="mocov2" if cfg.method == "moco" else "byol", device=device, seed=cfg.seed,
                       num_workers=cfg.workers, rank=d.rank, world_size=d.world_size)


# ---------------------------------------------------------------------------------------------
# model, schedule, checkpoints


def _build_model(cfg: TrainConfig, n_records: int, world_size: int = 1) -> torch.nn.Module:
    if cfg.method == "moco":
        # Shuffle-BN: one process splits its BatchNorms into groups and shuffles the keys among
        # them; several ranks shuffle the keys across ranks and keep plain per-rank BatchNorm.
        return MoCo(cfg.arch, cfg.small_stem, queue_size=queue_size_for(n_records, cfg.queue_size),
                    momentum=0.999 if cfg.ema is None else cfg.ema, temperature=cfg.temperature,
                    width=cfg.width, shuffle_bn=cfg.shuffle_bn,
                    bn_splits=1 if world_size > 1 else DEFAULT_BN_SPLITS, seed=cfg.seed)
    return BYOL(cfg.arch, cfg.small_stem, momentum=0.996 if cfg.ema is None else cfg.ema, width=cfg.width)


def _lr_at(peak: float, step: int, total: int) -> float:
    """Cosine decay per step from the peak to 0 (no warm-up, as MoCo v2's code)."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate()),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: str, cfg: TrainConfig, model, optimizer, scaler, step: int, epoch: int) -> None:
    ckpt = {
        "format": CHECKPOINT_FORMAT, "method": cfg.method, "arch": cfg.arch, "small_stem": cfg.small_stem,
        "width": cfg.width, "image_size": cfg.image_size,
        "backbone": model.backbone.state_dict(),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": int(step), "epoch": int(epoch), "config": dataclasses.asdict(cfg), "rng": _rng_state(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a reader sees the old checkpoint or the new one, never half


def load_checkpoint(path: str, cfg: Optional[TrainConfig] = None) -> dict:
    """A trainer checkpoint, checked against ``cfg`` (method, arch, stem, width); CheckpointError names the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist (nothing to --resume)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, pickled objects
        raise CheckpointError(f"checkpoint {path!r} is corrupt or unreadable ({type(e).__name__}: {e}); "
                              f"delete it or pass another --resume path") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path!r} is not an objloader trainer checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [k for k in ("model", "optimizer", "step", "epoch", "config", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path!r} lacks {', '.join(missing)}: it holds a backbone only and cannot resume training")
    if cfg is not None:
        for key in ("method", "arch", "small_stem", "width"):
            have = checkpoint_width(ckpt) if key == "width" else ckpt.get(key)  # no width: 64 (older checkpoints)
            if have != getattr(cfg, key):
                raise CheckpointError(f"{path!r} was written with {key}={have!r}, but this run has "
                                      f"{key}={getattr(cfg, key)!r}; resume with the same {key} or another --out")
    return ckpt


# ---------------------------------------------------------------------------------------------
# logging


class _Logger:
    """metrics.jsonl, TensorBoard (when installed) and a tqdm bar, on rank 0 only."""

    def __init__(self, cfg: TrainConfig, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.bar = self.tb = self.file = None
        if not enabled:
            return
        os.makedirs(cfg.out, exist_ok=True)
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        if start == 0 and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run; a resumed one appends
        elif start > 0:
            self._truncate_after(start)
        self.file = open(self.metrics_path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.out, "tb"), purge_step=start or None)
        except ImportError:
            pass
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"{cfg.method}/{cfg.loader}", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be redone)."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.metrics_path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k in ("loss", "lr", "img_per_s", "data_wait"):
                self.tb.add_scalar(f"train/{k}", rec[k], rec["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}",
                                 wait=f"{rec['data_wait']:.0%}", refresh=False)

    def close(self) -> None:
        for h in (self.bar, self.tb, self.file):
            if h is not None:
                h.close()


def _plot_loss(metrics_path: str, png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path, encoding="utf-8") as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, on_batch: Optional[Callable] = None) -> dict:
    """Train; returns {"step", "epoch", "loss" (the last step's), "checkpoint", "seconds", "model"}.

    ``on_batch(step, batch)`` (optional) sees every batch this rank trains on (tests use it to
    check the shards).
    """
    device = _pick_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    d = _init_distributed(device)
    log = print if d.main else (lambda *a, **k: None)
    if cfg.data is None:
        if d.main:
            cfg = dataclasses.replace(cfg, data=demo_train_path(log=log))
        _barrier(d)
        if not d.main:
            cfg = dataclasses.replace(cfg, data=demo_train_path(log=log))

    torch.manual_seed(cfg.seed)  # same initial weights (and queue) on every rank
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    loader = _build_loader(cfg, d, device)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg.data!r}: fewer records per rank than --batch-size {cfg.batch_size}; "
                         f"lower the batch size")
    total = cfg.epochs * steps_per_epoch
    stop = total if cfg.max_steps is None else min(cfg.max_steps, total)
    model = _build_model(cfg, _dataset_size(cfg.data), d.world_size).to(device)
    if cfg.channels_last:  # the convolutions then run NHWC, converting their NCHW inputs once
        model = model.to(memory_format=torch.channels_last)
    global_batch = cfg.batch_size * d.world_size
    peak_lr = cfg.base_lr * global_batch / 256
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=peak_lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    use_scaler = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    ckpt_path = os.path.join(cfg.out, CHECKPOINT_NAME)
    step = 0
    if cfg.resume is not None:
        src = cfg.resume or ckpt_path
        ckpt = load_checkpoint(src, cfg)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{src!r} does not fit this run's model/optimizer "
                                  f"(another --queue-size, --batch-size or dataset?): {e}") from e
        _set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        old = ckpt["config"]
        if old.get("batch_size") != cfg.batch_size or old.get("data") != cfg.data:
            warnings.warn(f"resuming {src!r} written with batch_size={old.get('batch_size')}, "
                          f"data={old.get('data')!r}; the step position may not match this run")
        log(f"resumed from {src} at step {step} (epoch {step // steps_per_epoch})")

    ddp_model = model
    if d.enabled:
        # Buffers stay per rank: the queue is identical by construction (keys are all-gathered).
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    logger = _Logger(cfg, stop, step, d.main)
    if d.main:
        moco = ""
        if cfg.method == "moco":
            shuffle = ("off" if not cfg.shuffle_bn else "across ranks" if d.enabled
                       else f"split BN into up to {DEFAULT_BN_SPLITS} groups")
            moco = f", queue {model.queue.shape[0]}, Shuffle-BN {shuffle}"
        log(f"{cfg.method} on {cfg.loader}: {cfg.data}, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
            f"global batch {global_batch}, peak lr {peak_lr:.4g}, {d.world_size} process(es) on {device}{moco}")

    model.train()
    loss_val = float("nan")
    win_t, win_wait, win_imgs, win_loss, win_n = time.perf_counter(), 0.0, 0, 0.0, 0
    epoch = step // steps_per_epoch
    t_start = time.perf_counter()
    while step < stop:
        epoch = step // steps_per_epoch
        loader.set_epoch(epoch)
        skip = step - epoch * steps_per_epoch  # batches of this epoch done before the checkpoint
        it = iter(loader)
        t_wait = time.perf_counter()
        for i, batch in enumerate(it):
            if i < skip:
                t_wait = time.perf_counter()
                continue
            win_wait += time.perf_counter() - t_wait
            if on_batch is not None:
                on_batch(step, batch)
            for g in optimizer.param_groups:
                g["lr"] = _lr_at(peak_lr, step, total)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                loss = ddp_model(batch.views)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            model.momentum_update(step / total)
            loss_val = float(loss.detach())
            win_loss += loss_val
            win_n += 1
            win_imgs += len(batch.views) * d.world_size
            logger.step()
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss is {loss_val} at step {step}; lower --lr or disable --amp")
            if step % cfg.log_every == 0 or step == stop:
                now = time.perf_counter()
                span = max(now - win_t, 1e-9)
                logger.log({"step": step, "epoch": epoch, "loss": win_loss / win_n,
                            "lr": optimizer.param_groups[0]["lr"], "img_per_s": win_imgs / span,
                            "data_wait": win_wait / span})
                win_t, win_wait, win_imgs, win_loss, win_n = now, 0.0, 0, 0.0, 0
            if cfg.save_every and step % cfg.save_every == 0 and step < stop and d.main:
                _save_checkpoint(ckpt_path, cfg, model, optimizer, scaler, step, step // steps_per_epoch)
            if step >= stop:
                break
            t_wait = time.perf_counter()
        del it  # closes the engine's epoch iterator when we stop mid-epoch
    seconds = time.perf_counter() - t_start
    if d.main:
        _save_checkpoint(ckpt_path, cfg, model, optimizer, scaler, step, step // steps_per_epoch)
    logger.close()
    if d.main:
        try:
            _plot_loss(logger.metrics_path, os.path.join(cfg.out, "loss.png"),
                       f"{cfg.method} / {cfg.loader} / {cfg.arch}")
        except Exception as e:  # the plot is a convenience; the run itself succeeded
            warnings.warn(f"loss curve not written: {e}")
        log(f"done: {step} steps in {seconds:.1f} s, final loss {loss_val:.4f}; "
            f"{ckpt_path}, {logger.metrics_path}, {os.path.join(cfg.out, 'loss.png')}")
    _barrier(d)
    if d.owns_group:
        dist.destroy_process_group()
    return {"step": step, "epoch": step // steps_per_epoch, "loss": loss_val, "checkpoint": ckpt_path,
            "seconds": seconds, "model": model}


# ---------------------------------------------------------------------------------------------
# command line (train/moco.py, train/byol.py)


def build_parser(method: str):
    """The flags of train/{method}.py, mapped 1:1 onto :class:`TrainConfig`."""
    import argparse

    from ..loaders import ENGINES

    D = TrainConfig(method=method)
    desc = {
        "moco": "MoCo v2 (momentum encoder, queue of negatives, MLP head, InfoNCE at temperature 0.2) on an "
                "object-aware loader. SGD momentum 0.9, wd 1e-4, lr = --lr x global batch / 256, cosine decay.",
        "byol": "BYOL (projector and predictor MLPs 4096 -> 256, target momentum 0.996 -> 1 on a cosine). "
                "Uses plain SGD (momentum 0.9, wd 1e-4, lr = --lr x global batch / 256, cosine decay) instead "
                "of the paper's LARS, to keep it simple; base lr 0.05.",
    }[method]
    p = argparse.ArgumentParser(
        prog=f"train/{method}.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=desc + " Multi-process: torchrun --nproc_per_node N train/" + method + ".py ... "
                    "(gloo on CPU, nccl on CUDA; each rank reads its own shard; --batch-size is per rank).")
    p.add_argument("--loader", default=D.loader, choices=list(ENGINES), help="loading engine")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a built dataset directory; None: demo/built/train under the current directory, "
                        "generated and built on first use")
    p.add_argument("--oa-crop", action="store_true", help="OA-Crop: crop each sample's views inside one of its boxes")
    p.add_argument("--bg-mixup", type=float, default=D.bg_mixup, metavar="P",
                   help="per-view BG-Mixup probability (the paper uses 0.4 with MoCo v2)")
    p.add_argument("--bg-mode", default=D.bg_mode, choices=["soft", "hard"], help="soft BG-Mixup or BG-HardMix")
    p.add_argument("--arch", default=D.arch, choices=list(ARCHS), help="torchvision ResNet backbone")
    p.add_argument("--small-stem", action="store_true", help="3x3 stride-1 stem without max-pool (low resolutions)")
    p.add_argument("--width", type=int, default=D.width, help="base channels of the ResNet (64 = torchvision)")
    p.add_argument("--image-size", type=int, default=D.image_size, help="side of the views in pixels")
    p.add_argument("--epochs", type=int, default=D.epochs, help="epochs (the cosine schedule spans them)")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="images per rank per step")
    p.add_argument("--lr", type=float, default=DEFAULT_BASE_LR[method],
                   help="base learning rate per 256 images (peak lr = LR x global batch / 256)")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bfloat16 autocast on CPU, float16 + GradScaler on CUDA")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last (NHWC) memory format for the network: faster with --amp on CUDA")
    p.add_argument("--out", default=f"runs/{method}", metavar="DIR",
                   help="output directory: checkpoint.pt, metrics.jsonl, loss.png, tb/")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from CKPT (no value: DIR/checkpoint.pt) at the same step")
    p.add_argument("--seed", type=int, default=D.seed, help="seed of the weights and of every augmentation")
    p.add_argument("--workers", type=int, default=None,
                   help="loader CPU workers/threads per process (None: the CPUs available to this process "
                        "divided by torchrun's processes on this machine, LOCAL_WORLD_SIZE, at least 1)")
    p.add_argument("--save-every", type=int, default=D.save_every, metavar="N",
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--log-every", type=int, default=D.log_every, metavar="N", help="metrics.jsonl line every N steps")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop after N steps (the schedule still spans --epochs)")
    if method == "moco":
        p.add_argument("--queue-size", type=int, default=D.queue_size,
                       help="negatives in the queue; scaled down to a power of two <= records / 2 for small datasets")
        p.add_argument("--temperature", type=float, default=D.temperature, help="InfoNCE temperature")
        p.add_argument("--no-shuffle-bn", dest="shuffle_bn", action="store_false",
                       help="turn Shuffle-BN off. Shuffle-BN (MoCo Sec. 3.3) normalises the keys in another "
                            "grouping of the batch than their queries: in one process BatchNorm is split into up "
                            "to 8 groups and the keys are shuffled among them; with several ranks the keys are "
                            "shuffled across ranks (shuffle_bn=%(default)s without this flag)")
    p.add_argument("--ema", type=float, default=0.999 if method == "moco" else 0.996,
                   help="momentum of the key encoder" if method == "moco"
                   else "base momentum of the target network (raised to 1 on a cosine)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (None: cuda:LOCAL_RANK when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(method: str, argv=None) -> int:
    args = build_parser(method).parse_args(argv)
    kw = {k: v for k, v in vars(args).items() if k != "no_progress"}
    try:
        cfg = TrainConfig(method=method, progress=not args.no_progress, **kw)
        train(cfg)
    except (CheckpointError, ValueError) as e:
        print(f"train/{method}.py: error: {e}", file=sys.stderr)
        return 2
    return 0
