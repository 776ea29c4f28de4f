"""What a training run writes and reads back: its checkpoint, its metrics and its loss curve.

Split from the loop in :mod:`objloader.ssl.trainer` so that file reads top-down as the training
itself. Checkpoint (``OUT/checkpoint.pt``, written atomically): the backbone contract of
:mod:`objloader.checkpoint` plus ``model`` (momentum encoder, queue), ``optimizer``, ``scaler``,
``step``, ``epoch``, ``config`` and ``rng``, all tensors or plain types, so
``torch.load(path, weights_only=True)`` reads it. ``cfg`` below is a trainer ``TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import sys

import numpy as np
import torch

from ..checkpoint import CHECKPOINT_FORMAT, CheckpointError, checkpoint_width
from ..fileio import FileWriteError, write_atomic
from .methods import recipe

__all__ = ["save_checkpoint", "load_checkpoint", "set_rng_state", "RunLogger", "plot_loss"]


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: str, cfg, model, optimizer, scaler, step: int, epoch: int) -> None:
    """Everything a resumed run needs to continue at ``step`` exactly (weights, optimizer,
    scaler, every RNG), written atomically."""
    ckpt = {
        "format": CHECKPOINT_FORMAT, "method": cfg.method, "arch": cfg.arch, "small_stem": cfg.small_stem,
        "width": cfg.width, "image_size": cfg.image_size,
        "head_prefix": recipe(cfg.method).head_prefix,  # where load_encoder finds the projection head
        "backbone": model.backbone.state_dict(),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": int(step), "epoch": int(epoch), "config": dataclasses.asdict(cfg), "rng": _rng_state(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Serialised in memory, then written as plain bytes: torch's own file writer reports a full
    # disk as RuntimeError "unexpected pos", without the path or errno. write_atomic names both,
    # removes its partial file and leaves the previous checkpoint in place.
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    try:
        write_atomic(path, lambda f: f.write(buf.getbuffer()))
    except FileWriteError as e:
        raise CheckpointError(f"checkpoint not saved: {e}") from None


def load_checkpoint(path: str, cfg=None) -> dict:
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


# The RNG states travel as tensors and lists so that weights_only=True can read them back.
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


def set_rng_state(state: dict) -> None:
    """Restore the RNG states a checkpoint saved (CUDA only when the same devices are there)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# metrics and the loss curve


class RunLogger:
    """metrics.jsonl, TensorBoard (when installed) and a tqdm bar, on rank 0 only."""

    def __init__(self, cfg, total: int, start: int, enabled: bool):
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

    def _write(self, rec: dict, scalars: dict) -> bool:
        """One metrics.jsonl line and its TensorBoard scalars ({tag: value}); False when disabled."""
        if not self.enabled:
            return False
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, rec["step"])
        return True

    def log(self, rec: dict) -> None:
        if not self._write(rec, {f"train/{k}": rec[k] for k in ("loss", "lr", "img_per_s", "data_wait")}):
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}",
                                 wait=f"{rec['data_wait']:.0%}", refresh=False)

    def log_eval(self, rec: dict) -> None:
        """An evaluation line (the kNN monitor's ``knn_top1``): metrics.jsonl, TensorBoard, the bar."""
        if not self._write(rec, {"eval/knn_top1": rec["knn_top1"]}):
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"knn {100 * rec['knn_top1']:.1f} %", refresh=False)
        print(f"epoch {rec['epoch']}: kNN top-1 {100 * rec['knn_top1']:.2f} % ({rec['knn_seconds']:.1f} s)",
              file=sys.stderr if self.bar is not None else sys.stdout, flush=True)

    def close(self) -> None:
        for h in (self.bar, self.tb, self.file):
            if h is not None:
                h.close()


def plot_loss(metrics_path: str, png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path, encoding="utf-8") as f:
        lines = [json.loads(ln) for ln in f if ln.strip()]
    recs = [r for r in lines if "loss" in r]
    knn = [r for r in lines if "knn_top1" in r]  # the kNN monitor's lines
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if knn:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in knn], [100 * r["knn_top1"] for r in knn], "C1o-")
        ax2.set_ylabel("kNN top-1 on val (%)", color="C1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
