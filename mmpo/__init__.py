"""mmpo: preference optimisation (the DPO family) for vision-language, video-language and diffusion models."""

__version__ = "0.1.0"
