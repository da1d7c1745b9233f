"""mimkit: masked-image-modeling pretraining of Vision Transformers."""

__version__ = "0.1.0"
