"""Hypothesis profiles for the fuzz tests (every reader of a user file or value).

The default run is bounded and stable: a fixed number of examples per reader, derandomized, no
example database, so CI sees the same inputs every time and the folder stays under a minute.
The long run draws fresh random inputs: LORAKIT_FUZZ_EXAMPLES=10000 python -m pytest tests/fuzz
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]

settings.register_profile(
    "lorakit-default",
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_IS_FINE,
)
settings.register_profile(
    "lorakit-long",
    max_examples=int(os.environ.get("LORAKIT_FUZZ_EXAMPLES") or 0) or 100,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_IS_FINE,
)
settings.load_profile("lorakit-long" if os.environ.get("LORAKIT_FUZZ_EXAMPLES") else "lorakit-default")
