"""Worker of tests/test_scale.py, started by torchrun: pretrain a tiny config (overrides on the command
line), then, for a sharded run, write the gathered full model and optimizer state to
``<out_dir>/full_state.pt`` on rank 0 (what a one-process run must resume to).
``MIMKIT_TEST_ASYNC_DCP=1`` makes a sharded run write its periodic checkpoints asynchronously, as on GPUs.

Written as a careful user script is: the work happens inside a function, and the trainer is closed
(process groups and threads torn down in order) before the function returns."""

import os
import sys
from pathlib import Path

import torch

from mimkit.config import load_config
from mimkit.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    cfg = load_config(ROOT / "configs/mae_fashion_mnist.yaml", argv)
    trainer = Trainer(cfg)
    try:
        if os.environ.get("MIMKIT_TEST_ASYNC_DCP") == "1" and trainer.sharded:
            trainer.checkpointer.async_group = trainer.new_group(backend="gloo")  # what a GPU run sets up: async DCP writes
        trainer.train()
        if cfg.train.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer, options=opts)
            if int(os.environ.get("RANK", "0")) == 0:
                torch.save({"model": model_sd, "optimizer": optim_sd}, Path(cfg.train.out_dir) / "full_state.pt")
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
