"""Recovery benchmark for latent-space (SAE) defenses of language models."""

__version__ = "0.1.0"
