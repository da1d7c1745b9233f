import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def fashion_mnist_available() -> bool:
    from mimkit.data import find_fashion_mnist

    try:
        find_fashion_mnist()
        return True
    except Exception:
        return False


needs_fmnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST not installed (scripts/setup_env.sh installs it; CI always has it)",
)


TINY_RUN = [
    "model.encoder.embed_dim=32", "model.encoder.depth=2", "model.encoder.num_heads=2",
    "model.decoder.embed_dim=16", "model.decoder.depth=1", "model.decoder.num_heads=2",
    "data.limit=256", "train.log_every_steps=1", "train.progress_bar=false", "train.tensorboard=false",
    "eval.knn_at_end=false", "eval.picture_at_end=false", "optim.warmup_epochs=1", "train.num_threads=1",
    "train.epochs=1",
]
"""Overrides of configs/mae_fashion_mnist.yaml for a run of a few seconds (a 2-block encoder on 256
images, no evaluation, no picture, one thread); a test adds its batch size and what it checks."""


def tiny_model_config(**enc):
    from mimkit.methods import DecoderConfig, ModelConfig
    from mimkit.nn import ViTConfig

    kw = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    kw.update(enc)
    return ModelConfig(ViTConfig(**kw), DecoderConfig(embed_dim=16, depth=1, num_heads=2))
