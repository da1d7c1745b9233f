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


def tiny_model_config(**enc):
    from mimkit.methods import DecoderConfig, ModelConfig
    from mimkit.nn import ViTConfig

    kw = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    kw.update(enc)
    return ModelConfig(ViTConfig(**kw), DecoderConfig(embed_dim=16, depth=1, num_heads=2))
