import os

# Keep numba/ffcv/DALI from oversubscribing the 2-core machines tests run on.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Hypothesis profiles: "ci" (the default) is reproducible and quick, a few seconds a property
# test; `pytest --hypothesis-profile thorough` (the hypothesis plugin's option) runs many more.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the test extra is not installed: property tests skip themselves
    pass
else:
    _QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=8,
                              suppress_health_check=_QUIET)
    settings.register_profile("thorough", deadline=None, max_examples=300, suppress_health_check=_QUIET)
    settings.load_profile("ci")
