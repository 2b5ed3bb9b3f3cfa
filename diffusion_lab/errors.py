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


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config key or value (or a constructor argument) that cannot work; the message names the key and the fix."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used: unreadable, not this project's, unsafe, or from another model."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """``ckpt_path`` / ``ckpt=`` names neither a checkpoint file nor a folder that holds one."""
