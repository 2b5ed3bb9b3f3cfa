"""Networks with the contract ``net(x_t, t) -> Tensor`` (t: integer timesteps)."""

from diffusion_lab.nets.unet import UNet, UNetConfig, timestep_embedding

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]
