"""Published numbers that reports put beside ours (../shared/reference/paper-numbers.md).

Each entry is (what a sampler's config must hold, {S: FID}): a cell whose config contains those items and
whose S is listed gets the published FID beside its own. Nothing here names a sampler family in code.
"""

from __future__ import annotations

from typing import Any

Entry = tuple[dict[str, Any], dict[int, float]]

# DDIM (Song et al. 2021) Table 1, FID on CIFAR-10 (quadratic skip), same DDPM-trained model.
DDIM_TABLE1_CIFAR10: list[Entry] = [
    ({"name": "ddim", "eta": 0.0}, {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16, 1000: 4.04}),
    ({"name": "ddim", "eta": 0.2}, {10: 14.04, 20: 7.11, 50: 4.77, 100: 4.25, 1000: 4.09}),
    ({"name": "ddim", "eta": 0.5}, {10: 16.66, 20: 8.35, 50: 5.25, 100: 4.46, 1000: 4.29}),
    ({"name": "ddim", "eta": 1.0}, {10: 41.07, 20: 18.36, 50: 8.01, 100: 5.78, 1000: 4.73}),
    ({"name": "ddpm", "variance": "fixed_large"}, {10: 367.43, 20: 133.37, 50: 32.72, 100: 9.99, 1000: 3.17}),
]
# DPM-Solver (Lu et al. 2022) on the discrete-time DDPM CIFAR-10 model: FID 4.65 at 12 NFE.
DPM_SOLVER_CIFAR10: list[Entry] = [({"name": "dpm_solver"}, {12: 4.65})]

PAPER_FID: dict[str, list[Entry]] = {"cifar10": DDIM_TABLE1_CIFAR10 + DPM_SOLVER_CIFAR10}


def published(data: str, sampler: dict[str, Any], num_steps: int) -> float | None:
    """The published FID for a cell of ``data`` drawn by the sampler ``config`` at ``num_steps``, if any."""
    for match, table in PAPER_FID.get(data, []):
        if all(sampler.get(k) == v for k, v in match.items()) and num_steps in table:
            return table[num_steps]
    return None
