import os

# Keep numba/ffcv/DALI from oversubscribing the 2-core machines tests run on.
os.environ.setdefault("OMP_NUM_THREADS", "1")
