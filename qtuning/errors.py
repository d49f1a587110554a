"""One exception type for bad input, and the CLI wrapper that turns it into one clear line instead of a traceback."""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
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


def run_cli(main: Callable[[], Any]) -> None:
    """Run a ``hydra.main`` entry point so that a config Hydra cannot compose (an unknown option or key, a malformed
    override) is also one ``error:`` line with status 2, instead of Hydra's own report and status 1."""
    from hydra.errors import HydraException, InstantiationException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra then raises its errors instead of reporting and exiting
    try:
        main()
    except Exception as err:
        # composing the config failed (not a constructor inside the run: that traceback is worth seeing)
        composing = isinstance(err, HydraException) and not isinstance(err, InstantiationException)
        if not composing and not (isinstance(err, ValueError) and _raised_in_hydra(err)):
            raise
        message = str(err).split("Config search path")[0]  # the search path is Hydra's internals, not the user's
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def _raised_in_hydra(err: BaseException) -> bool:
    """Whether the innermost frame of ``err`` is Hydra's own code (e.g. its defaults list rejecting an override)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}hydra{os.sep}" in frames[-1].filename
