import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def fashion_mnist_available() -> bool:
    """Whether the Fashion-MNIST files are found. Only "not found" counts as absent: any other error of
    ``find_fashion_mnist`` is a bug and fails the collection instead of skipping half the suite."""
    from mimkit.data import DataError, find_fashion_mnist

    try:
        find_fashion_mnist()
        return True
    except DataError:
        return False


# scripts/test.sh (README's test command, which CI runs) installs the data and sets this: there a missing
# data set fails the tests that need it instead of skipping them
REQUIRE_FMNIST = os.environ.get("MIMKIT_REQUIRE_FMNIST") == "1"
needs_fmnist = pytest.mark.skipif(
    not REQUIRE_FMNIST and not fashion_mnist_available(),
    reason="Fashion-MNIST not installed (scripts/setup_env.sh installs it; scripts/test.sh requires it)",
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


@pytest.fixture
def compile_spy(monkeypatch):
    """``torch.compile`` and ``torch.compiler.cudagraph_mark_step_begin`` watched: yields ``(modes, marks)``,
    ``(mode, options)`` of every compile call and one entry per marked step. The compiled module runs through
    AOTAutograd with the eager backend (inductor's C++ build takes minutes on 2 cores; on a CPU torch runs
    no CUDA graphs anyway); dynamo's caches are reset before and after."""
    real_compile = torch.compile
    modes: list = []
    marks: list = []

    def spy(model, mode=None, options=None, **kw):
        modes.append((mode, options))
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    torch._dynamo.reset()
    yield modes, marks
    torch._dynamo.reset()
