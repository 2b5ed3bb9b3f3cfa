"""A quality gate: upper bounds on named scores (``val/fid``, ``val/fid_ddim50_digits-pixels``, ...), checked once
at the end of training by :class:`diffusion_lab.callbacks.FIDEvaluation` and usable on any score dict.

Why a band and not one number: a digits FID of a 3,000-step run moves with the training seed and with the
sample set. The bands of the default run (conf/experiment/digits.yaml) are the worst value measured over the
training seeds recorded in experiments/digits/regression/README.md plus two bootstrap sds of that run;
outside them the run is not the same run any more (a doubled unclipped DDIM-50 FID, the kind of change issue 17
reported, is outside them).
"""

from __future__ import annotations

import logging
from typing import Mapping

from diffusion_lab.errors import UserError

log = logging.getLogger(__name__)


class QualityGateError(UserError, ValueError):
    """A run outside its quality bands (raised by diffusion-lab-train after everything is saved), or a bound
    that is not a number."""


def check_gate(scores: Mapping[str, float], bounds: Mapping[str, float]) -> list[str]:
    """The failures of ``scores`` against ``bounds`` (``{score name: largest allowed value}``), one line each;
    an empty list when every bounded score is within its band. A bounded score that is missing, or is not a
    finite number (NaN: the samples were garbage), fails."""
    failures = []
    for name, upper in bounds.items():
        try:
            upper = float(upper)
        except (TypeError, ValueError):
            raise QualityGateError(f"quality gate bound for {name!r} is {upper!r}, not a number") from None
        value = scores.get(name)
        if value is None:
            failures.append(f"{name}: not computed (known scores: {', '.join(sorted(scores)) or 'none'})")
        elif not value <= upper:  # also catches NaN
            failures.append(f"{name} = {value:.4g} is above its band (<= {upper:g})")
    return failures
