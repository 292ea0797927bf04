"""DNA / RNA / protein sequences: alphabets, readers, data sets, masked-diffusion denoiser, metrics, CLI hooks."""
