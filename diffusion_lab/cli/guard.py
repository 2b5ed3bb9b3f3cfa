"""The guard of every command-line entry point: a :class:`~diffusion_lab.errors.UserError` (or a Hydra config
error) becomes one line on stderr, ``error: <message>``, and exit status 2.

``HYDRA_FULL_ERROR=1`` or ``DIFFUSION_LAB_TRACEBACK=1`` shows the traceback; every other exception is a bug and
keeps its traceback. Hydra's own input errors (a mistyped override key, an override that does not parse, a YAML
syntax error in a config file) happen while Hydra composes the config, before the task function runs;
:func:`main_guard` placed *above* ``@hydra.main`` reports them the same way (see :func:`describe_hydra_error`).
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from typing import Any, Callable

from diffusion_lab.errors import UserError

_GUARD_ACTIVE = "_DIFFUSION_LAB_GUARD_ACTIVE"


def _wants_traceback() -> bool:
    return os.environ.get("DIFFUSION_LAB_TRACEBACK") == "1" or (
        os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_GUARD_ACTIVE) != "1"
    )


def main_guard(entry: Callable[..., Any]) -> Callable[..., Any]:
    """Print a :class:`UserError` (or a Hydra config error) as ``error: <message>`` and exit with status 2.

    Two placements, both supported:

    - above ``@hydra.main`` (``@main_guard`` / ``@hydra.main(...)`` / ``def main(cfg)``): covers the task *and*
      Hydra's composition (mistyped keys, unparsable overrides, YAML syntax errors). Hydra normally prints and
      exits itself; the guard sets ``HYDRA_FULL_ERROR=1`` for the call so the exception reaches it instead.
    - below ``@hydra.main``: covers the task function only.

    With ``HYDRA_FULL_ERROR=1`` or ``DIFFUSION_LAB_TRACEBACK=1`` set by the user, everything is re-raised whole.
    Any other exception is a bug and keeps its traceback.
    """

    @functools.wraps(entry)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _wants_traceback() or os.environ.get(_GUARD_ACTIVE) == "1":  # the user asked, or an outer guard reports
            return entry(*args, **kwargs)
        saved = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", _GUARD_ACTIVE)}
        os.environ["HYDRA_FULL_ERROR"] = os.environ[_GUARD_ACTIVE] = "1"
        stderr = sys.stderr
        held = sys.stderr = _HoldHydraJobLine(stderr)
        try:
            return entry(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - only user errors are turned into a message; the rest re-raise
            sys.stderr = stderr
            message = describe_user_error(error)
            if message is None:
                held.release()  # a bug: Hydra's line and the traceback, as without the guard
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        finally:
            sys.stderr = stderr
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    return wrapper


class _HoldHydraJobLine:
    """stderr, except Hydra's "Error executing job with overrides: [...]" line (written just before it re-raises
    the task's exception), which is held back: a user error is then one line, a bug gets it back."""

    PREFIX = "Error executing job with overrides:"

    def __init__(self, stream: Any) -> None:
        self.stream, self.held = stream, []

    def write(self, text: str) -> int:
        if text.startswith(self.PREFIX):
            self.held.append(text)
            return len(text)
        return self.stream.write(text)

    def release(self) -> None:
        for text in self.held:
            self.stream.write(text)
        self.held.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def describe_user_error(error: BaseException) -> str | None:
    """The one-paragraph message for a user error, or None when ``error`` is a bug (keep its traceback)."""
    from omegaconf.errors import InterpolationResolutionError

    cause: BaseException | None = error
    while cause is not None:  # also a user error raised in a constructor that hydra's instantiate() wrapped
        if isinstance(cause, UserError):
            return str(cause)
        # a resolver's user error (e.g. ${distill_max_steps:...}): OmegaConf keeps it only as the context
        resolver = cause.__context__ if isinstance(cause, InterpolationResolutionError) else None
        cause = cause.__cause__ or resolver
    return describe_hydra_error(error)


def describe_hydra_error(error: BaseException) -> str | None:
    """Hydra / OmegaConf / YAML errors raised while composing the config, as one message naming the fix."""
    import yaml
    from hydra.errors import CompactHydraException, InstantiationException

    # Hydra wraps a YAML error from a config file in its own exception: report the file, line and column.
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, yaml.MarkedYAMLError):
            return _describe_yaml_error(cause)
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, InstantiationException):
        return None  # a failing constructor: the library's own message and traceback say more
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if isinstance(error, (InterpolationResolutionError, MissingMandatoryValue)):  # a config value, not a bug
        return f"{str(error).strip()}\nFix that value on the command line or in the config file."
    if not isinstance(error, CompactHydraException):
        return None
    unknown = _unknown_override_key(error)
    if unknown is not None:
        return unknown
    text = str(error).strip()
    if error.__cause__ is not None and str(error.__cause__).strip():
        text += f"\n{str(error.__cause__).strip()}"
    return text


def _describe_yaml_error(error: Any) -> str:
    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = error.context_mark or error.problem_mark
    parts = []
    if error.context:
        parts.append(f"{at(error.context_mark)}: {error.context}" if error.context_mark else error.context)
    if error.problem:
        parts.append(f"{at(error.problem_mark)}: {error.problem}" if error.problem_mark else error.problem)
    where = mark.name if mark else "a config file"
    return (f"YAML syntax error in {where}: {'; '.join(parts)}. Fix the file (indentation, brackets, quotes) "
            "and run again.")


def _unknown_override_key(error: BaseException) -> str | None:
    """``trainer.max_step=10`` (no ``+``) -> 'unknown key trainer.max_step; did you mean trainer.max_steps?'."""
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = error.__cause__
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        return None
    full_key, key, parent = getattr(cause, "full_key", None), getattr(cause, "key", None), cause.parent_node
    if not full_key or key is None or not isinstance(parent, DictConfig):
        return None
    prefix = full_key[: -len(str(key))] if full_key.endswith(str(key)) else ""
    keys = sorted(str(k) for k in parent.keys())
    close = difflib.get_close_matches(str(key), keys, n=1, cutoff=0.6)
    hint = f" Did you mean {prefix}{close[0]}?" if close else f" Keys there: {', '.join(keys)}."
    return (f"unknown config key {full_key}.{hint} To add a new key on purpose, write +{full_key}=<value> "
            "(`diffusion-lab-train --cfg job` prints the whole config).")
