"""FSDP2 sharding and activation checkpointing for any method (``train.strategy=fsdp``,
``train.activation_checkpointing``).

Both are applied to the transformer blocks the method is built from (encoder, decoder, predictor,
regressor: every :class:`~mimkit.nn.Block`, :class:`~mimkit.nn.CrossBlock` and
:class:`~mimkit.nn.cae.RegressorBlock`), so no method needs code of its own:

* :func:`apply_activation_checkpointing` wraps each block in torch's non-reentrant
  ``checkpoint_wrapper``: its activations are recomputed in the backward pass instead of being kept
  (RNG state preserved, so drop-path draws are the same; state-dict keys are unchanged).
* :func:`shard_model` calls ``torch.distributed.fsdp.fully_shard`` on every block, then on the whole
  method (the embeddings, tokens, norms and heads left over form the root group). Parameters become
  ``DTensor`` shards over a 1-D device mesh of all ranks; the forward all-gathers one block at a
  time and the backward reduce-scatters its gradients. The mixed-precision policy computes in
  ``param_dtype`` (bf16 on GPU by default) and reduces gradients in fp32.

:class:`ShardedTrainModule` gives the sharded model the ``no_sync()`` context the loop uses for
gradient accumulation (FSDP2 spells it ``set_requires_gradient_sync``); :func:`wrap_for_training`
makes the module the loop calls for either strategy.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mimkit.train.distributed import DistInfo


def block_types() -> tuple[type, ...]:
    """The module classes that form one FSDP unit / activation-checkpointing region."""
    from mimkit.nn.cae import RegressorBlock
    from mimkit.nn.layers import Block, CrossBlock

    return (Block, CrossBlock, RegressorBlock)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of ``model`` (outermost matches only), in module order."""
    kinds = block_types()
    found: list[nn.Module] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(m, kinds):
            found.append(m)
            inside.append(name + ".")
    return found


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every transformer block of ``model`` with a non-reentrant checkpoint; returns how many.
    The wrapper strips its own prefix from state-dict keys, so checkpoints are unaffected."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as _apply,
    )

    kinds = block_types()
    n = len(transformer_blocks(model))
    _apply(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, kinds),
    )
    return n


def mixed_precision_policy(amp_dtype: torch.dtype | None):
    """FSDP2 policy: compute in ``amp_dtype`` (``None``: fp32), reduce gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, info: DistInfo, amp_dtype: torch.dtype | None) -> nn.Module:
    """``fully_shard`` every transformer block, then the root; in place. Returns ``model``."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # each rank built its own random init (seeded by rank); start every shard from rank 0's, as DDP does
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    # the loop never modifies the returned loss in place (the warning's concern)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = mixed_precision_policy(amp_dtype)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class ShardedTrainModule(nn.Module):
    """The sharded method as the loop calls it: ``forward`` passes through, ``no_sync()`` turns the
    gradient reduce-scatter off for the micro-batches before the last of an accumulation step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


def wrap_for_training(model: nn.Module, info: DistInfo, *, sharded: bool, activation_checkpointing: bool,
                      amp_dtype: torch.dtype | None) -> nn.Module:
    """The module the loop calls. DDP (``train.strategy=ddp``, several processes) replicates the model;
    FSDP2 (``sharded``) shards parameters, gradients and optimizer state over the ranks, in place: the
    model's parameters become ``DTensor`` shards, so its optimizer must be made anew. Activation
    checkpointing wraps the blocks for both. One process: the model itself."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if sharded:
        shard_model(model, info, amp_dtype)
        return ShardedTrainModule(model)
    if info.enabled:
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=model.capabilities.find_unused_parameters,
        )
    return model
