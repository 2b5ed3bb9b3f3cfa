"""Hydra configs (a package so the wheel ships them; Hydra imports it to compose ``pkg://diffusion_lab.conf``)."""

import diffusion_lab.resolvers  # noqa: F401  (registers ${run_group:...} and ${run_name:...})
