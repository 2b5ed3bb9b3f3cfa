"""diffusers-compatible pipelines and the diffusers folder format."""

from diffusion_lab.pipelines.diffusers_format import FormatError, load_unet, save_unet
from diffusion_lab.pipelines.pipeline import (DDIMPipeline, DDPMPipeline, DiffusionPipeline, ImagePipelineOutput,
                                          PipelineArgumentError)
from diffusion_lab.pipelines.scheduler import SchedulerConfig

__all__ = ["DDPMPipeline", "DDIMPipeline", "DiffusionPipeline", "ImagePipelineOutput", "SchedulerConfig",
           "FormatError", "PipelineArgumentError", "load_unet", "save_unet"]
