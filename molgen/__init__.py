"""molgen: few-step diffusion sampling and gradient-free guidance for scientific design."""

__version__ = "0.1.0"
