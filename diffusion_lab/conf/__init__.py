"""Hydra config groups, shipped inside the package (``pkg://diffusion_lab.conf``)."""
