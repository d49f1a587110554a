"""One exception type for bad input, and the CLI wrapper that turns it into one clear line instead of a traceback."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("qtuning")

F = TypeVar("F", bound=Callable[..., Any])

EXIT_BAD_INPUT = 2


class QTuningError(ValueError):
    """Bad input from the user: a config key, a data file or row, a model path. The message names which."""


def exit_on_bad_input(fn: F) -> F:
    """Wrap a CLI entry point: a `QTuningError` prints `error: <message>` to stderr and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QTuningError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper  # type: ignore[return-value]
