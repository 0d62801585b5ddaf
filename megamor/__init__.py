"""megamor: pretraining and evaluation of Mixture-of-Recursions language models."""

__version__ = "0.9.0"
