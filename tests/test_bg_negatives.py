"""Background negatives (MoCo --bg-negatives, after CLAD): the loss against MoCo's eq. 1 written
literally with the extra negatives, bit-identical with the option off, the background images
every engine gives, and a training step on each engine."""
import math

import cv2
import numpy as np
import pytest
import torch

from objloader.augment.reference import normalize
from objloader.loaders import make_loader
from objloader.loaders.device_stage import background_images
from objloader.ssl.moco import MoCo, info_nce
from objloader.ssl.trainer import TrainConfig, train
from objloader.store import BuildOptions, build
from objloader.errors import ConfigError


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def test_info_nce_with_background_negatives_is_eq_1_written_per_sample():
    g = torch.Generator().manual_seed(0)
    q, k, queue, k_bg = (_unit(torch.randn(n, 8, generator=g, dtype=torch.float64)) for n in (5, 5, 7, 5))
    valid = torch.tensor([True, False, True, True, False])
    t = 0.2
    losses = []
    for i in range(5):
        logits = [float(q[i] @ k[i])] + [float(q[i] @ queue[j]) for j in range(7)]
        logits += [float(q[i] @ k_bg[m]) for m in range(5) if valid[m]]
        z = [v / t for v in logits]
        losses.append(-z[0] + math.log(sum(math.exp(v) for v in z)))
    assert float(info_nce(q, k, queue, t, k_bg, valid)) == pytest.approx(sum(losses) / 5, rel=1e-12)
    # none valid: the plain loss; and the plain loss is MoCo's former expression bit for bit
    none = torch.zeros(5, dtype=torch.bool)
    assert float(info_nce(q, k, queue, t, k_bg, none)) == pytest.approx(float(info_nce(q, k, queue, t)), rel=1e-12)
    former = torch.nn.functional.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / t,
                                               torch.zeros(5, dtype=torch.long))
    assert torch.equal(info_nce(q, k, queue, t), former)


def test_moco_forward_adds_the_key_encoders_background_embeddings_and_is_unchanged_without():
    torch.manual_seed(0)
    model = MoCo("resnet18", small_stem=True, queue_size=16, width=8).eval()  # eval: no shuffle, no enqueue
    views, bg = torch.randn(4, 2, 3, 32, 32), torch.randn(4, 3, 32, 32)
    has_bg = torch.tensor([True, True, False, True])
    with torch.no_grad():
        q = torch.nn.functional.normalize(model.head(model.backbone(views[:, 0])), dim=1)
        k = model._encode_keys(views[:, 1])
        k_bg = model._encode_keys(bg)
        plain = info_nce(q, k, model.queue, model.temperature)
        extra = info_nce(q, k, model.queue, model.temperature, k_bg, has_bg)
        assert torch.equal(model(views), plain)
        assert torch.equal(model(views, bg, has_bg), extra)
    assert float(extra) > float(plain)  # more negatives: a larger loss


def test_background_images_tile_each_samples_patch_as_bg_mixup_does():
    rng = np.random.default_rng(1)
    patches = torch.from_numpy(rng.integers(0, 256, (3, 3, 5, 5), dtype=np.uint8))
    out = background_images(patches, 12)
    want = torch.empty(3, 3, 12, 12)
    for b in range(3):
        for y in range(12):
            for x in range(12):
                want[b, :, y, x] = patches[b, :, y % 5, x % 5].float() / 255
    assert torch.allclose(out, normalize(want), atol=1e-6)
    assert torch.equal(background_images(patches, 12, normalize=False, dtype=torch.uint8),
                       (want * 255).round().to(torch.uint8))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """12 scenes with an object and a mask each (a background rectangle for most), built."""
    src = tmp_path_factory.mktemp("bgneg_src")
    rng = np.random.default_rng(5)
    for i in range(12):
        d = src / ("a" if i % 2 else "b")
        d.mkdir(exist_ok=True)
        h, w = int(rng.integers(64, 96)), int(rng.integers(64, 96))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4:h // 2, w // 4:w // 2] = 255
        cv2.imwrite(str(d / f"{i:02d}.png"), img)
        cv2.imwrite(str(d / f"{i:02d}.mask.png"), mask)
    out = tmp_path_factory.mktemp("bgneg_built") / "ds"
    build(str(src), str(out), BuildOptions(masks="gt", max_res=96, mask_res=32, shard_size=5), workers=1,
          log=lambda *a: None)
    return str(out)


def _first_batch(path, engine):
    loader = make_loader(path, engine, batch_size=4, image_size=32, return_backgrounds=True, device="cpu",
                         num_workers=1, seed=3, shuffle=False)
    return next(iter(loader))


def test_every_engine_gives_the_same_background_images(scenes):
    got = {e: _first_batch(scenes, e) for e in ("torch", "ffcv", "dali")}
    ref = got["torch"]
    assert ref.backgrounds.shape == (4, 3, 32, 32) and ref.has_bg.dtype == torch.bool and ref.has_bg.any()
    for e, b in got.items():
        assert torch.equal(b.index, ref.index) and torch.equal(b.has_bg, ref.has_bg), e
        # patches agree to one grey level across engines: 1/255 after normalisation by std >= 0.224
        assert (b.backgrounds - ref.backgrounds).abs().max() <= 1.01 / 255 / 0.224, e


@pytest.mark.filterwarnings("ignore:MoCo queue")
@pytest.mark.parametrize("engine", ["torch", "ffcv", "dali"])
def test_a_step_with_background_negatives_trains_on_every_engine(scenes, tmp_path, engine):
    res = train(TrainConfig(method="moco", loader=engine, data=scenes, image_size=32, batch_size=4, epochs=1,
                            max_steps=1, workers=1, out=str(tmp_path), progress=False, save_every=0, device="cpu",
                            bg_negatives=True, knn_every=0))
    assert res["step"] == 1 and math.isfinite(res["loss"])


def test_background_negatives_are_a_moco_option():
    with pytest.raises(ConfigError, match="bg_negatives"):
        TrainConfig(method="byol", bg_negatives=True)
