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

setup(
    name="objloader",
    version="0.1.0",
    description="Object-aware contrastive learning (ContraCAM, OA-Crop, BG-Mixup) as fast data loaders",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"objloader.kernels": "kernels"},
    install_requires=[
        "numpy>=1.24",
        "torch>=2.4",
        "torchvision>=0.19",
        "numba>=0.59",
        "opencv-python>=4.8",
        "ffcv>=1.0.2",
        "nvidia-dali-cuda130>=2.0",
        "pydensecrf2>=1.1",
        "scikit-image>=0.22",
        "tqdm>=4.60",
        "pillow>=9",
        "matplotlib>=3.7",  # benchmark plots, loss curves
    ],
    extras_require={"test": ["pytest>=7", "tensorboard>=2.14", "hypothesis>=6.100", "pycocotools>=2.0.7"]},
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
