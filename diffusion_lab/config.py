"""Start-up checks of a composed config: unknown keys and values outside their allowed set fail before any
work starts, with a message that names the key, the allowed values and (for typos) the closest match."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import types
import typing
from typing import Any, Iterator

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_lab.diffusion.denoiser import net_output_channels
from diffusion_lab.diffusion.gaussian import LEARNED_SIMPLE_MESSAGE
from diffusion_lab.errors import ConfigError

log = logging.getLogger(__name__)


__all__ = ["ConfigError", "validate_config", "accepted_keys", "check_out_channels"]

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first bad key or value found in ``cfg`` (any of the three commands' configs).

    Every ``_target_`` node, nested ones too (a sampler inside a callback), is checked against its target's
    signature: unknown keys, text where a number is wanted, and values outside a ``Literal[...]`` annotation (the
    one place the allowed values are written down).
    """
    for path, node in _target_nodes(cfg, ""):
        _check_keys(path, node)
    _check_max_steps(cfg)
    check_out_channels(cfg)
    _check_training_objective(cfg)


def build_samplers(cfg: DictConfig) -> dict[str, Any]:
    """Every sampler the config names (``sampler``, ``callbacks.fid.sampler``, ``...extra_samplers.ddim50``),
    built now by its key: a constructor's :class:`ConfigError` names the key it came from."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from diffusion_lab.samplers.base import Sampler

    samplers = {}
    for path, node in _target_nodes(cfg, ""):
        target = get_object(node["_target_"])
        if not (inspect.isclass(target) and issubclass(target, Sampler)):
            continue
        try:
            samplers[path] = instantiate(node)
        except (ConfigError, InstantiationException) as error:
            cause = error if isinstance(error, ConfigError) else error.__cause__
            if not isinstance(cause, ConfigError):
                raise
            raise cause.at(path) from None
    return samplers


def check_samplers(samplers: dict[str, Any], diffusion: Any) -> None:
    """Each sampler against the model it will sample (num_steps <= T, a learned variance where one is asked for)."""
    for path, sampler in samplers.items():
        try:
            sampler.check(diffusion)
        except ConfigError as error:
            raise error.at(path) from None


def _check_training_objective(cfg: DictConfig) -> None:
    """diffusion-lab-train only (its config has a trainer): a learned variance needs a loss that trains it."""
    if OmegaConf.select(cfg, "trainer._target_", default=None) is None:
        return
    if OmegaConf.select(cfg, "model.objective", default=None) is not None:
        defaults = {"loss": "simple", "loss_weighting": "none"}
        legacy = {k: v for k in defaults if (v := OmegaConf.select(cfg, f"diffusion.{k}", default=defaults[k]))
                  != defaults[k]}
        if legacy:
            raise ConfigError(f"the objective is given twice: model.objective (objective=...) and "
                              f"{', '.join(f'diffusion.{k}={v}' for k, v in legacy.items())}; choose it once, with "
                              "objective=simple|min_snr|vlb|hybrid (and leave diffusion.loss at simple)")
        return  # the module checks the objective against the diffusion when training starts
    if (OmegaConf.select(cfg, "diffusion.variance", default=None) == "learned_range"
            and OmegaConf.select(cfg, "diffusion.loss", default="simple") == "simple"):
        raise ConfigError(LEARNED_SIMPLE_MESSAGE)


def _check_max_steps(cfg: DictConfig) -> None:
    """Training is step-based: ``trainer.max_steps`` must be a positive count (Lightning reads -1 as "no limit",
    which with ``max_epochs: null`` silently becomes 1000 epochs)."""
    if OmegaConf.select(cfg, "trainer._target_", default=None) is None:
        return
    steps = OmegaConf.select(cfg, "trainer.max_steps", default=None)
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if steps == -1 and isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0:
        log.info("trainer.max_steps=-1: no step limit, training stops after trainer.max_epochs=%d epochs", epochs)
        return
    if steps is None or isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(
            f"trainer.max_steps={steps!r}: training needs a positive number of optimizer steps, e.g. "
            "trainer.max_steps=3000 (for an epoch limit instead, set trainer.max_steps=-1 trainer.max_epochs=N)"
        )


def check_out_channels(cfg: DictConfig) -> None:
    """A start-up error when model.net.out_channels disagrees with data.channels and diffusion.variance."""
    channels = OmegaConf.select(cfg, "data.channels", default=None)
    variance = OmegaConf.select(cfg, "diffusion.variance", default=None)
    out = OmegaConf.select(cfg, "model.net.out_channels", default=None)
    if channels is None or variance is None or out is None:
        return
    want = net_output_channels(channels, variance)
    if int(out) != want:
        raise ConfigError(
            f"model.net.out_channels={out} but data.channels={channels} with diffusion.variance={variance} needs "
            f"{want} ({'the mean part and v: 2C' if variance == 'learned_range' else 'C'}); remove the override "
            "(the default ${net_out_channels:...} follows data.channels and diffusion.variance) or change the variance"
        )


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node.keys():
            if str(key) == "hydra" and not path:
                continue
            child = node._get_node(key)
            if child is not None and not child._is_missing() and not child._is_interpolation():
                yield from _target_nodes(node[key], f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _target_nodes(item, f"{path}[{i}]")


def accepted_keys(target: Any) -> set[str] | None:
    """The keyword arguments ``target`` accepts, or None when it takes arbitrary ``**kwargs``.

    A class that takes ``**kwargs`` may name a dataclass ``config_class`` whose fields are the accepted keys.
    """
    config_class = getattr(target, "config_class", None)
    if config_class is not None and dataclasses.is_dataclass(config_class):
        return {f.name for f in dataclasses.fields(config_class)}
    if dataclasses.is_dataclass(target):
        return {f.name for f in dataclasses.fields(target)}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _check_keys(path: str, node: DictConfig) -> None:
    target_name = node["_target_"]
    try:
        target = get_object(target_name)
    except Exception as error:  # noqa: BLE001 - hydra raises several types here
        raise ConfigError(f"{path}._target_={target_name!r} cannot be imported: {error}") from error
    _check_types(path, node, target)
    allowed = accepted_keys(target)
    if allowed is None:
        return
    for key in node.keys():
        key = str(key)
        if key in _HYDRA_KEYS or key in allowed:
            continue
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        hint = f" Did you mean {path}.{close[0]}?" if close else ""
        raise ConfigError(
            f"unknown key {path}.{key} for {target_name}.{hint} Allowed keys: {', '.join(sorted(allowed))}"
        )


_SCALARS = (bool, int, float)
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def _check_types(path: str, node: DictConfig, target: Any) -> None:
    """A value given as text where the target's signature wants a number or a bool (``trainer.max_steps=abc``)
    fails here, naming the key and the type, instead of deep inside the library."""
    try:
        # a dataclass's fields resolve in the module of the class that declares each one (inherited fields too)
        hints = typing.get_type_hints(target if dataclasses.is_dataclass(target) else
                                      target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check
        return
    for key in node.keys():
        key = str(key)
        child = node._get_node(key)
        if key in _HYDRA_KEYS or key not in hints or child is None or child._is_missing() or child._is_interpolation():
            continue
        value = node[key]
        choices = _literal_values(hints[key])
        if choices is not None:
            if value not in choices:
                allowed = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)  # YAML's spelling
                raise ConfigError(f"{path}.{key}={value!r} is not allowed; allowed values: {allowed}")
            continue
        wanted = _scalar_types(hints[key])
        if not wanted or str in wanted or not isinstance(value, str):
            continue
        names = " or ".join(dict.fromkeys(_TYPE_NAMES[t] for t in wanted))
        raise ConfigError(f"{path}.{key}={value!r} is not {names}; write e.g. {path}.{key}={_example(wanted)}")


def _literal_values(annotation: Any) -> tuple[Any, ...] | None:
    """('a', 'b') for ``Literal['a', 'b']`` (None allowed too for ``Literal[...] | None``); None for anything else."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if not literals or len(literals) + (type(None) in args) != len(args):
        return None
    values = tuple(v for lit in literals for v in typing.get_args(lit))
    return values + ((None,) if type(None) in args else ())


def _scalar_types(annotation: Any) -> tuple[type, ...]:
    """(int,) for ``int`` / ``Optional[int]``; () when the annotation is anything but scalars (lists, Literals...)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    args = tuple(a for a in args if a is not type(None))
    if args and all(a in _SCALARS or a is str for a in args):
        return args
    return ()


def _example(wanted: tuple[type, ...]) -> str:
    return {bool: "true", int: "10", float: "0.5"}.get(wanted[0], "...")
