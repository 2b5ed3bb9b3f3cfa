"""The sampler registry: one yaml per sampler in ``conf/sampler/``, and nothing else to edit.

``conf/sampler/<name>.yaml`` holds the sampler's ``_target_`` (its class, by full module path) and every field
with its default; the file's name is the class's ``name``. Everything that lists or builds samplers reads this
folder: the ``sampler=`` group of train and sample, the evaluation grid (``grid.samplers``), the common sampler
test. Adding a sampler is its module, its yaml and its tests.

A grid row is a registered name (``ddim``), or a mapping ``{sampler: ddim, eta: 1.0, steps: [10, 50]}`` whose
other keys override the yaml's fields, or a mapping with a ``_target_`` of its own (a sampler outside the
registry). :func:`build` turns one into a :class:`Sampler`, refusing unknown names and fields by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from pathlib import Path
from typing import Any, Mapping

from hydra.utils import get_class
from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers.base import Sampler

CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "sampler"
ROW_KEYS = ("sampler", "steps")  # a grid row's own keys; every other key is a field of the sampler


@functools.cache
def registered() -> dict[str, dict[str, Any]]:
    """Registered name -> its yaml (``_target_`` and field defaults), in name order."""
    out = {}
    for path in sorted(CONF_DIR.glob("*.yaml")):
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if not isinstance(config, dict) or "_target_" not in config:
            raise ConfigError(f"{path}: a sampler's yaml needs a _target_ (the class, e.g. "
                              "diffusion_lab.samplers.ddim.DDIMSampler) and its fields")
        out[path.stem] = config
    return out


def sampler_class(target: str) -> type[Sampler]:
    """The class a ``_target_`` names, checked to be a :class:`Sampler`."""
    try:
        cls = get_class(target)
    except Exception as error:  # hydra wraps ImportError/AttributeError in its own
        raise ConfigError(f"_target_={target!r} cannot be imported ({error}); give the sampler class by its "
                          "full module path, e.g. diffusion_lab.samplers.ddim.DDIMSampler") from None
    if not (isinstance(cls, type) and issubclass(cls, Sampler)):
        raise ConfigError(f"_target_={target!r} is not a Sampler subclass (diffusion_lab.samplers.base.Sampler)")
    return cls


def classes() -> dict[str, type[Sampler]]:
    """Registered name -> class (imports every registered sampler's module)."""
    return {name: sampler_class(config["_target_"]) for name, config in registered().items()}


def unknown_name(name: object) -> ConfigError:
    names = list(registered())
    close = difflib.get_close_matches(str(name), names, n=1)
    return ConfigError(f"sampler {name!r} is not registered{f' (did you mean {close[0]}?)' if close else ''}; the "
                       f"registered samplers (conf/sampler/*.yaml) are: {', '.join(names)}")


def build(row: str | Mapping[str, Any], **overrides: Any) -> Sampler:
    """A :class:`Sampler` from a registered name or a row mapping (see the module docstring), with ``overrides``
    (e.g. num_steps) applied last; ``steps`` in a row is ignored here (the grid reads it)."""
    fields = {"sampler": row} if isinstance(row, str) else dict(row)
    name = fields.pop("sampler", None)
    fields.pop("steps", None)
    if "_target_" in fields:
        target = fields.pop("_target_")
        if name is not None:
            raise ConfigError(f"give either sampler={name!r} or _target_={target!r}, not both")
        base: dict[str, Any] = {}
    elif name is None:
        raise ConfigError("a sampler row names a registered sampler (sampler: ddim) or a class (_target_: ...)")
    elif str(name) not in registered():
        raise unknown_name(name)
    else:
        base = dict(registered()[str(name)])
        target = base.pop("_target_")
    cls = sampler_class(target)
    allowed = [f.name for f in dataclasses.fields(cls)]
    values = {**base, **fields, **overrides}
    bad = [k for k in values if k not in allowed]
    if bad:
        close = difflib.get_close_matches(bad[0], allowed, n=1)
        raise ConfigError(f"{cls.name} has no field {bad[0]!r}{f' (did you mean {close[0]}?)' if close else ''}; its "
                          f"fields are: {', '.join(allowed)}")
    return cls(**values)
