"""lmkiln: turn an LLM checkpoint into a fast, served, 4-bit model."""

__version__ = "0.1.0"
