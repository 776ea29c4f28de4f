from setuptools import setup

# kernels/ sits at the top level of the repository but installs as objloader.kernels:
# there is no top-level `kernels` module in site-packages.
PACKAGES = [
    "objloader",
    "objloader.sources",
    "objloader.sources.demo",
    "objloader.cam",
    "objloader.store",
    "objloader.augment",
    "objloader.loaders",
    "objloader.ssl",
    "objloader.cli",
    "objloader.kernels",
]

# The optional libraries, one extra each; objloader.optional.EXTRAS names these extras in its
# "install it with" messages (tests/test_optional_deps.py checks that the two agree).
OPTIONAL = {
    "ffcv": ["ffcv>=1.0.2"],
    "dali": ["nvidia-dali-cuda130>=2.0"],  # CUDA 13, and the CPU
    "dali-cuda12": ["nvidia-dali-cuda120>=2.0"],
    "crf": ["pydensecrf2>=1.1"],
}

setup(
    name="objloader",
    version="0.1.0",
    description="Object-aware contrastive learning (ContraCAM, OA-Crop, BG-Mixup) as fast data loaders",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"objloader.kernels": "kernels"},
    # The core install: import objloader, build wds datasets, the torch engine, the device stage,
    # the trainers and ContraCAM without the CRF. FFCV, DALI and pydensecrf are imported only where
    # they are used (objloader/optional.py), so each is an extra: a user on CUDA 12, or without the
    # OpenCV headers FFCV builds against, can still install objloader.
    install_requires=[
        "numpy>=1.24",
        "torch>=2.4",
        "torchvision>=0.19",
        "numba>=0.59",
        "opencv-python>=4.8",
        "scikit-image>=0.22",
        "tqdm>=4.60",
        "pillow>=9",
        "matplotlib>=3.7",  # benchmark plots, loss curves
    ],
    extras_require={**OPTIONAL, "all": OPTIONAL["ffcv"] + OPTIONAL["dali"] + OPTIONAL["crf"],
                    "test": ["pytest>=7", "pytest-xdist>=3.5", "tensorboard>=2.14", "hypothesis>=6.100",
                             "pycocotools>=2.0.7"]},
    entry_points={
        "console_scripts": [
            "objloader-build=objloader.cli.build:main",
            "objloader-cam=objloader.cli.cam:main",
            "objloader-demo=objloader.cli.demo:main",
            "objloader-viz=objloader.cli.viz:main",
            "objloader-train-moco=objloader.cli.train:moco",
            "objloader-train-byol=objloader.cli.train:byol",
            "objloader-linear=objloader.cli.linear:main",
            "objloader-export=objloader.cli.export:main",
        ]
    },
)
