"""The base class of every error caused by the user's input (a config value, a file, a command-line argument).

Command-line entry points print a ``UserError``'s message without a Python traceback (``HYDRA_FULL_ERROR=1``
shows it); every other exception is a bug and keeps its traceback. Subclasses add ``ValueError`` /
``FileNotFoundError`` etc. so existing ``except`` clauses and tests keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


def main_guard(task):
    """Wrap a Hydra task function: a :class:`UserError` prints ``error: <message>`` and exits with status 2,
    without a traceback; with ``HYDRA_FULL_ERROR=1`` (or ``DIFFUSION_LAB_TRACEBACK=1``) it is re-raised whole.

    Use it under ``@hydra.main``: ``@hydra.main(...)`` then ``@main_guard`` then ``def main(cfg)``.
    """
    import functools
    import os
    import sys

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except UserError as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("DIFFUSION_LAB_TRACEBACK") == "1":
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper
