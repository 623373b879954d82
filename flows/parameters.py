"""The bounds and types of the flows' parameters, kept in one place.

The flows annotate their parameters with these types, so pydantic (and a
deployment's run form) refuses a value outside them before a run starts. The
command line builds its argument checks from the same bounds, so it refuses such
a value as a usage error before Prefect is even imported. This module imports
pydantic, never Prefect.
"""

from typing import Annotated, NamedTuple

from pydantic import Field

from flows import runners


class Bounds(NamedTuple):
    """The smallest and the largest value a numeric parameter accepts."""

    low: float
    high: float

    def field(self):
        return Field(ge=self.low, le=self.high)


PARALLEL = Bounds(1, 256)
RETRIES = Bounds(0, 50)
SECONDS = Bounds(0, 3600)
JITTER = Bounds(0, 1)

Parallel = Annotated[int, PARALLEL.field()]
Retries = Annotated[int, RETRIES.field()]
Seconds = Annotated[float, SECONDS.field()]
Jitter = Annotated[float, JITTER.field()]
Runner = Annotated[str, Field(pattern=runners.RUNNER_PATTERN)]
# An empty path would mean the current folder of whatever process runs the flow.
FolderPath = Annotated[str, Field(min_length=1)]
