"""The error classes of user input (a config value, a file, a command-line argument).

A :class:`UserError` is the user's to fix: the command-line entry points print its message as one line,
``error: <problem and fix>``, with exit status 2 and no traceback (diffusion_lab/cli/guard.py). Every other
exception is a bug and keeps its traceback. Subclasses add ``ValueError`` / ``FileNotFoundError`` etc. so that
``except`` clauses written against the builtin types keep working.

Rule: every check of user input raises a UserError subclass, also inside constructors (samplers, diffusion,
data, nets, the LightningModule, diffusers folders); Hydra's instantiate() wraps such an error and the guard
still finds it through ``__cause__``.
"""

from __future__ import annotations

import re


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config key or value (or a constructor argument) that cannot work; the message names the key and the fix."""

    def at(self, where: str) -> "ConfigError":
        """The same error placed in the config: ``num_steps=0: ...`` at ``callbacks.fid.sampler`` becomes
        ``callbacks.fid.sampler.num_steps=0: ...`` (a message that does not start with a key gets ``where: ``)."""
        message = str(self)
        key = re.match(r"[A-Za-z_][A-Za-z0-9_]*=", message)
        return type(self)(f"{where}.{message}" if key else f"{where}: {message}")


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used: unreadable, not this project's, unsafe, or from another model."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """``ckpt_path`` / ``ckpt=`` names neither a checkpoint file nor a folder that holds one."""
