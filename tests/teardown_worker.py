"""Worker of tests/test_scale.py::test_trainer_tears_down_its_process_groups (under torchrun, 2 ranks).

``argv[1]`` is the mode, ``argv[2]`` a JSON file rank 0 writes its observations to, the rest config
overrides:
- ``owned``: the trainer starts the process group; after ``train()`` the group still works (a caller
  may gather a sharded model) and a second ``train()`` is refused; after ``close()`` the group is gone
  and the trainer holds no module that references it; closing twice is harmless and a closed trainer
  refuses to train or save.
- ``caller``: the script starts the process group itself; ``close()`` destroys only the groups the
  trainer made and leaves the caller's group working.
- ``global``: the careless script: the trainer stays a module global and is never closed. An exit
  handler registered *before* mimkit is imported runs *after* mimkit's own (exit handlers run last in,
  first out) and records whether the process group was already torn down by then.
"""

import atexit
import json
import os
import sys
from pathlib import Path

mode, report, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
seen: dict = {"mode": mode}


def _write_report() -> None:
    import torch.distributed as dist

    seen["initialized_at_exit"] = dist.is_initialized()
    if int(os.environ.get("RANK", "0")) == 0:
        report.write_text(json.dumps(seen))


atexit.register(_write_report)  # before mimkit registers its exit handler: runs after it

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mimkit.config import load_config  # noqa: E402
from mimkit.train.loop import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
cfg = load_config(ROOT / "configs/mae_fashion_mnist.yaml", overrides)


def allreduce_ok(group=None) -> bool:
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    return t.item() == dist.get_world_size(group)


def refused(fn) -> str:
    try:
        fn()
        return "ran"
    except RuntimeError as e:
        return str(e)


def main() -> None:
    if mode == "caller":
        dist.init_process_group("gloo")
    trainer = Trainer(cfg)
    trainer.new_group(backend="gloo")  # a group of the trainer's own, as async DCP writes make on GPUs
    seen["groups_made"] = len(trainer.groups.made)
    trainer.train()
    seen["works_after_train"] = allreduce_ok()
    seen["second_train"] = refused(trainer.train)
    trainer.close()
    trainer.close()
    seen["initialized_after_close"] = dist.is_initialized()
    seen["trainer_groups_after_close"] = len(trainer.groups.made)
    seen["train_model_after_close"] = trainer.train_model is not None
    seen["train_after_close"] = refused(trainer.train)
    seen["save_after_close"] = refused(trainer.save)
    if mode == "caller":
        seen["caller_group_works"] = allreduce_ok()
        dist.destroy_process_group()


if mode == "global":
    trainer = Trainer(cfg)  # kept alive until the interpreter exits, never closed
    seen["step"] = trainer.train()["step"]
else:
    main()
