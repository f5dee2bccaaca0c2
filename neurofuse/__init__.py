"""neurofuse: fuse trained neural networks into one, without retraining."""

from neurofuse._version import __version__

__all__ = ["__version__"]
