"""Worker of tests/test_scale.py::test_trainer_tears_down_its_process_groups (under torchrun, 2 ranks).

``argv[1]`` is the mode, ``argv[2]`` a JSON file rank 0 writes its observations to, the rest config
overrides:
- ``owned``: the trainer starts the process group; after ``train()`` the group still works (a caller
  may gather a sharded model), after ``close()`` it is gone and the trainer holds no module that
  references it; closing twice is harmless and training a closed trainer is refused.
- ``caller``: the script starts the process group itself; ``close()`` destroys only the groups the
  trainer made and leaves the caller's group working.
- ``global``: the careless script: the trainer stays a module global and is never closed; it must be
  torn down at interpreter exit (the launcher checks the exit status).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mimkit.config import load_config
from mimkit.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
mode, report, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
cfg = load_config(ROOT / "configs/mae_fashion_mnist.yaml", overrides)


def allreduce_ok(group=None) -> bool:
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    return t.item() == dist.get_world_size(group)


def main() -> dict:
    seen: dict = {"mode": mode}
    if mode == "caller":
        dist.init_process_group("gloo")
    trainer = Trainer(cfg)
    trainer.new_group(backend="gloo")  # a group of the trainer's own, as async DCP writes make on GPUs
    seen["groups_made"] = len(trainer._groups)
    trainer.train()
    seen["works_after_train"] = allreduce_ok()
    trainer.close()
    trainer.close()
    seen["initialized_after_close"] = dist.is_initialized()
    seen["trainer_groups_after_close"] = len(trainer._groups)
    seen["train_model_after_close"] = trainer.train_model is not None
    try:
        trainer.train()
        seen["train_after_close"] = "ran"
    except RuntimeError as e:
        seen["train_after_close"] = str(e)
    if mode == "caller":
        seen["caller_group_works"] = allreduce_ok()
        dist.destroy_process_group()
    return seen


if mode == "global":
    trainer = Trainer(cfg)  # kept alive until the interpreter exits, never closed
    result = trainer.train()
    if trainer.info.is_main:
        report.write_text(json.dumps({"mode": mode, "step": result["step"]}))
else:
    seen = main()
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        report.write_text(json.dumps(seen))
