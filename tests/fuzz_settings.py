"""One rule for every property test's settings. `make test` runs the "ci" profile (registered in
conftest.py): derandomized, the same examples on every run and machine, no example database.
`DVSPREP_HYPOTHESIS=random` (or pytest's `--hypothesis-profile random`) runs random examples,
many more of them (`random` profile's max_examples, 1000; set HYPOTHESIS_MAX_EXAMPLES to change)."""
from __future__ import annotations

from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def fuzz(ci_examples: int) -> settings:
    """Settings for a property test that runs ci_examples fixed examples in the ci profile and the
    loaded profile's count (random and longer) otherwise."""
    base = settings.default
    n = ci_examples if base.derandomize else base.max_examples
    return settings(max_examples=n, deadline=None, suppress_health_check=_SUPPRESS)
