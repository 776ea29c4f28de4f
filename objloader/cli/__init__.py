"""Console commands: objloader-build, objloader-cam, objloader-demo, objloader-viz,
objloader-train-moco, objloader-train-byol, objloader-linear (see setup.py)."""
