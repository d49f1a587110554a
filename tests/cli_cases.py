"""Many command lines for the price of one start-up: ``python -m tests.cli_cases`` imports the entry points once, then
runs each case in a forked child exactly as ``python -m <module> <args>`` would (its own ``sys.argv``, stdout and
stderr, exit status). The cases come as JSON on stdin, ``[[module, [args...]], ...]``; the results go to stdout as
JSON, ``[{"returncode", "stdout", "stderr"}, ...]``.

Each bad-input case fails within a second of its start; as its own process it spent 10-15 s importing torch,
Lightning, transformers and Hydra first.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile


def run_case(module: str, args: list[str]) -> dict:
    """One command line in a forked child: its exit status and what it wrote."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: its own argv and output, and it never returns into the parent's code
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.argv = [module, *args]
                importlib.import_module(module).cli()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {
            "returncode": os.waitstatus_to_exitcode(status),
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def main() -> None:
    cases = json.load(sys.stdin)
    for module in {module for module, _ in cases}:
        importlib.import_module(module)  # once, before the first fork
    results = [run_case(module, args) for module, args in cases]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
