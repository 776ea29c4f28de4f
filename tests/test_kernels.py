"""Fused Triton kernels of the device stage (objloader.kernels) against the torch reference.

The kernels run on CPU through Triton's interpreter. TRITON_INTERPRET=1 acts when a function is
*decorated* by ``@triton.jit``, so it is set while a private copy of kernels/device_ops.py is
loaded here, and restored right after:

* setting it before the process's first ``import triton`` would also turn Triton's own standard
  library (tl.zeros, tl.sum, ...) into interpreted functions for the whole pytest process, and
  no compiled kernel could use them afterwards; so triton is imported first, without it. The
  kernels call none of those helpers, so the interpreted copy works whichever way triton was
  imported before (by another test module too);
* the copy is not registered as objloader.kernels: modules collected after this one still get
  the ordinary (compiled) kernels, and ``fused_available("cpu")`` stays False for them.
"""

import os

import triton  # noqa: I001  (first, without TRITON_INTERPRET: see above)

import dataclasses
import importlib.util
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from objloader.augment import reference as R
from objloader.augment import sample_params


def _load_interpreted_kernels():
    spec = importlib.util.find_spec("objloader.kernels")
    path = os.path.join(spec.submodule_search_locations[0], "device_ops.py")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod_spec = importlib.util.spec_from_file_location("objloader.kernels._device_ops_interpreted", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return mod


# On a GPU machine benchmarks/gpu_check.py runs this file with OBJLOADER_KERNELS_ON=cuda: every case
# then compares the compiled kernels on CUDA with the torch reference on CUDA and on the CPU, and
# the file named by OBJLOADER_KERNEL_REPORT receives each case's largest errors.
ON_CUDA = os.environ.get("OBJLOADER_KERNELS_ON") == "cuda"
DEV = "cuda" if ON_CUDA else "cpu"
if ON_CUDA:
    import objloader.kernels.device_ops as K
else:
    K = _load_interpreted_kernels()
ERRORS = []  # (test, dtype, max |fused - reference on DEV|, max |fused - reference on the CPU|)


@pytest.fixture(scope="module", autouse=True)
def _error_report():
    yield
    path = os.environ.get("OBJLOADER_KERNEL_REPORT")
    if path:
        import json

        with open(path, "w", encoding="utf-8") as f:
            json.dump({"device": DEV, "interpreted": bool(K.INTERPRETED), "cases": ERRORS}, f, indent=1)


B, V, S, P = 4, 2, 24, 7  # P does not divide S: the tiling wraps mid-view


def _inputs(b=B, s=S, p=P, n_patches=None, seed=0, levels=None):
    """Random uint8 views, soft uint8 masks (0 / 255 plateaus and ramps), uint8 patches."""
    rng = np.random.default_rng(seed)
    if levels is None:
        views = rng.integers(0, 256, (b, V, 3, s, s), dtype=np.uint8)
    else:  # few grey levels: many ties of r, g, b (hue edge cases) and grey pixels
        views = rng.choice(np.asarray(levels, np.uint8), size=(b, V, 3, s, s))
    ramp = np.linspace(-1.0, 2.0, s)[None, None, None, :] + rng.uniform(-0.5, 0.5, (b, V, 1, 1, 1))
    masks = (np.clip(ramp + np.zeros((1, 1, 1, s, 1)), 0, 1) * 255).round().astype(np.uint8)
    patches = rng.integers(0, 256, (n_patches or b, 3, p, p), dtype=np.uint8)
    return torch.from_numpy(views), torch.from_numpy(masks), torch.from_numpy(patches)


def _params(color="mocov2", p_mix=1.0, b=B, has_bg=None, ring_count=0, seed=3):
    has_bg = np.array([True, True, False, True] * b, bool)[:b] if has_bg is None else has_bg
    return sample_params(seed, 0, np.arange(10, 10 + b), has_bg=has_bg, image_sizes=np.full((b, 2), 64),
                         views=V, p_mix=p_mix, color=color, ring_count=ring_count)


def _assert_close(got, want, atol) -> float:
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (got.double() - want.double()).abs()
    if got.dtype == torch.uint8:
        assert int(diff.max()) <= 1, int(diff.max())
        assert float((diff > 0).float().mean()) < 1e-3
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)
    return float(diff.max())


def _compare(views, masks, patches, params, atol=1e-4, **kw):
    """The fused kernels against the reference on their device (and, on CUDA, on the CPU too)."""
    on_dev = [t.to(DEV) for t in (views, masks, patches)]
    got = K.apply_device_ops_fused(*on_dev, params, **kw)
    want = R.apply_device_ops(*on_dev, params, **kw)
    err = _assert_close(got, want, atol)
    err_cpu = _assert_close(got.cpu(), R.apply_device_ops(views, masks, patches, params, **kw), atol) if ON_CUDA else None
    ERRORS.append({"test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], "dtype": str(got.dtype),
                   "max_err": err, "max_err_vs_cpu_reference": err_cpu})
    return got.cpu(), want.cpu()


def test_interpreter_is_active():
    assert K.INTERPRETED != ON_CUDA  # interpreted on the CPU, compiled on CUDA


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("p_mix", [0.0, 1.0])
@pytest.mark.parametrize("color", ["mocov2", "byol", "none"])
def test_matches_reference(color, p_mix, hard):
    params = _params(color, p_mix)
    if p_mix:
        assert (params.partner >= 0).all()
    if color == "byol":
        assert params.blur[:, 0].all()  # blur p 1.0 on view 0
    _compare(*_inputs(), params, hard=hard)


def test_ring_buffer_partners():
    # Nobody in the batch has a background: every partner is a ring-buffer row (index >= B).
    params = _params("mocov2", 1.0, has_bg=np.zeros(B, bool), ring_count=3)
    assert (params.partner >= B).all()
    views, masks, patches = _inputs(n_patches=B + 3)
    _compare(views, masks, patches, params)
    # Mixed with in-batch partners, some views unmixed (mix False or partner -1).
    params = _params("byol", 0.5, has_bg=np.array([True, False, False, False]), ring_count=3, seed=5)
    assert (params.partner == -1).any() and (params.partner >= 0).any()
    _compare(views, masks, patches, params, hard=True)


@pytest.mark.parametrize("color", ["mocov2", "byol", "none"])
def test_uint8_output_without_normalize(color):
    params = _params(color, 1.0)
    got, want = _compare(*_inputs(), params, dtype=torch.uint8, normalize=False)
    if color == "none":
        assert torch.equal(got, want)


def test_float_outputs():
    params = _params("byol", 1.0)
    data = _inputs(seed=1)
    _compare(*data, params, dtype=torch.float16, atol=2e-3)
    _compare(*data, params, dtype=torch.float32, normalize=False)
    _compare(*data, params, dtype=torch.bfloat16, atol=3e-2)
    _compare(*data, params, dtype=torch.float64)


def test_float_masks_and_patches():
    views, masks, patches = _inputs(seed=2)
    params = _params("mocov2", 1.0)
    _compare(views, masks.float() / 255.0, patches.float() / 255.0, params)
    _compare(views, masks.double() / 255.0, patches.half() / 255.0, params, hard=True)


def test_every_jitter_order():
    """Each of the 24 permutations on some view, with hue edge cases (ties, grey pixels) and a
    contrast factor of exactly 1 on a few views (no mean needed)."""
    perms = np.array(list(itertools.permutations(range(4))), np.int64)  # [24, 4]
    b = len(perms) // V
    params = _params("mocov2", 1.0, b=b, has_bg=np.ones(b, bool))
    rng = np.random.default_rng(7)
    shape = (b, V)
    contrast = rng.uniform(0.6, 1.4, shape).astype(np.float32)
    contrast[0, 0] = contrast[5, 1] = 1.0
    params = dataclasses.replace(
        params,
        jitter=np.ones(shape, bool),
        jitter_order=perms.reshape(b, V, 4),
        brightness=rng.uniform(0.6, 1.4, shape).astype(np.float32),
        contrast=contrast,
        saturation=rng.uniform(0.0, 2.0, shape).astype(np.float32),
        hue=rng.uniform(-0.5, 0.5, shape).astype(np.float32),
        grayscale=np.zeros(shape, bool),
        blur=np.zeros(shape, bool),
        solarize=rng.random(shape) < 0.5,
    )
    views, masks, patches = _inputs(b=b, s=12, p=5, seed=4, levels=[0, 37, 128, 200, 255])
    _compare(views, masks, patches, params)
    _compare(views, masks, patches, dataclasses.replace(params, mix=np.zeros(shape, bool)), hard=True)


def test_multi_block_views_and_chunked_means(monkeypatch):
    """Views spread over several pixel blocks and reduction chunks, mixed sigmas up to 2."""
    monkeypatch.setattr(K, "_MAX_BLOCK", 128)
    monkeypatch.setattr(K, "_MAX_CHUNKS", 2)
    params = _params("mocov2", 1.0)
    shape = params.mix.shape
    params = dataclasses.replace(params, jitter=np.ones(shape, bool), blur=np.array([[True, False], [True, True]] * 2),
                                 sigma=np.array([[2.0, 0.3], [0.1, 1.3]] * 2, np.float32),
                                 grayscale=np.array([[False, False], [True, False]] * 2))
    _compare(*_inputs(s=20), params)


def test_errors_match_reference():
    views, masks, patches = (t.to(DEV) for t in _inputs(s=6))
    params = dataclasses.replace(_params("mocov2", 1.0), blur=np.ones((B, V), bool), sigma=np.full((B, V), 2.0, np.float32))
    with pytest.raises(ValueError, match="reflect"):  # radius 6 >= 6 px; the reference fails in F.pad
        K.apply_device_ops_fused(views, masks, patches, params)
    with pytest.raises(RuntimeError):
        R.apply_device_ops(views, masks, patches, params)
    params = _params("none", 1.0, has_bg=np.zeros(B, bool), ring_count=3)
    with pytest.raises(IndexError):  # partners index rows B.. that these patches lack
        K.apply_device_ops_fused(views, masks, patches, params)


def test_dispatcher_picks_one_implementation_per_device(monkeypatch):
    from objloader.kernels import dispatch
    from objloader.kernels.cpu_ops import apply_device_ops_cpu

    assert dispatch.select_device_ops("cpu") == (apply_device_ops_cpu, "numba")
    assert dispatch.select_device_ops("meta") == (R.apply_device_ops, "torch reference")
    # a CUDA device: Triton's kernels when its driver works, the torch reference otherwise
    monkeypatch.setattr(dispatch, "_cuda_driver_ok", lambda: True)
    monkeypatch.setattr(dispatch, "_fused_module", lambda: K)
    assert dispatch.select_device_ops("cuda") == (K.apply_device_ops_fused, "triton")
    monkeypatch.setattr(dispatch, "_fused_module", lambda: None)  # triton not importable
    assert dispatch.select_device_ops("cuda") == (R.apply_device_ops, "torch reference")
    monkeypatch.setattr(dispatch, "_fused_module", lambda: K)
    monkeypatch.setattr(dispatch, "_cuda_driver_ok", lambda: False)  # no working driver
    assert dispatch.select_device_ops("cuda") == (R.apply_device_ops, "torch reference")


def test_device_stage_uses_the_dispatcher():
    from objloader.loaders import DeviceStage, LoaderConfig

    assert DeviceStage(LoaderConfig(batch_size=2, image_size=32)).implementation == "numba"


def test_lazy_export():
    import objloader.kernels as kernels

    assert {"apply_device_ops_fused", "select_device_ops", "fused_available"} <= set(kernels.__all__)
    if ON_CUDA or importlib.util.find_spec("triton") is not None:
        assert callable(kernels.apply_device_ops_fused)


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import objloader.kernels.device_ops as C

assert not C.INTERPRETED
target = GPUTarget("cuda", 90, 32)
n = 0

def compile_(fn, signature, constexprs):
    global n
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    compiled = triton.compile(ASTSource(fn, sig, constexprs), target=target)
    assert "cubin" in compiled.asm
    n += 1

common = {"views_ptr": "*u8", "ip_ptr": "*i32", "fp_ptr": "*fp32", "S": "i32", "PH": "i32", "PW": "i32",
          "NCHUNK": "i32"}
for mask_t, patch_t, out_t, normalize in [("*u8", "*u8", "*fp32", True), ("*fp32", "*fp16", "*fp16", True),
                                          ("*u8", "*u8", "*u8", False)]:
    io = dict(common, masks_ptr=mask_t, patches_ptr=patch_t)
    mix = dict(HAS_MIX=True, MASK_U8=mask_t == "*u8", PATCH_U8=patch_t == "*u8", HARD=normalize)
    compile_(C._contrast_mean_kernel, dict(io, red_ptr="*i32", partials_ptr="*fp32"), dict(mix, BLOCK=1024))
    for blur in (False, True):
        compile_(C._mix_colour_kernel, dict(io, partials_ptr="*fp32", buf_ptr="*fp32", out_ptr=out_t),
                 dict(mix, ANY_JITTER=True, ANY_BLUR=blur, NORMALIZE=normalize, OUT_U8=not normalize,
                      NCHUNK_P2=32, BLOCK=1024))
    compile_(C._blur_cols_finish_kernel, {"src_ptr": "*fp32", "taps_ptr": "*fp32", "blur_ptr": "*i32",
                                          "ip_ptr": "*i32", "out_ptr": out_t, "S": "i32", "K": "i32"},
             dict(NORMALIZE=normalize, OUT_U8=not normalize, BLOCK=1024))
compile_(C._mix_colour_kernel, dict(common, masks_ptr="*u8", patches_ptr="*u8", partials_ptr="*fp32",
                                    buf_ptr="*fp32", out_ptr="*fp32"),
         dict(HAS_MIX=False, MASK_U8=True, PATCH_U8=True, HARD=False, ANY_JITTER=False, ANY_BLUR=False,
              NORMALIZE=True, OUT_U8=False, NCHUNK_P2=1, BLOCK=1024))
compile_(C._blur_rows_kernel, {"src_ptr": "*fp32", "dst_ptr": "*fp32", "taps_ptr": "*fp32", "S": "i32",
                               "K": "i32"}, dict(BLOCK=1024))
print("compiled", n)
"""


def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter does not type-check Triton code: compile every kernel variant for an H100
    (sm_90: front end, LLVM and the wheel's ptxas), which needs no GPU. In a fresh process, with
    a private cache, so nothing imported under TRITON_INTERPRET interferes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode and ("ptxas" in proc.stderr and "No such file" in proc.stderr):
        pytest.skip("no ptxas in this triton install")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 14" in proc.stdout
