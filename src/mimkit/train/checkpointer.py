"""Checkpoints of a run and its hold on the run directory.

Owns: claiming ``train.out_dir`` (create, lock with :class:`~mimkit.train.checkpoint.RunLock`,
remove temporary files of killed writers, check that a checkpoint fits) and releasing it; what a
checkpoint holds (:meth:`Checkpointer.state_dict`, with the input record of :func:`training_input`:
the normalisation the run trains with, its image size and channels, which evaluation and exports
take from it); writing checkpoints (``checkpoint.pt`` with
numbered copies and pruning for ``train.strategy=ddp``; DCP directories for ``fsdp``, asynchronously
on GPUs); the last good checkpoint and the time of the last save; and, at the final save of a
sharded run, the consolidated model (kept on rank 0 for the end-of-run evaluation, exported as
``encoder.safetensors``). The file formats, checksums and atomic writes are
:mod:`mimkit.train.checkpoint`'s; every method here that says so is collective (every rank calls
it; rank 0 writes, and the ranks agree on success before any goes on).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mimkit.config import Config, to_dict
from mimkit.train import checkpoint as ckpt
from mimkit.train.distributed import DistInfo, all_ok, all_reduce_sum, unwrap


def training_input(cfg: Config) -> dict:
    """The input the run trains on, as every checkpoint and export records it (``input``):
    ``{"mean": [...], "std": [...], "img_size": [H, W], "in_chans": C, "origin": text}``.

    ``mean`` / ``std`` are those the training data is normalised with (:mod:`mimkit.train.data`):
    ``data.mean`` / ``data.std`` when set, each else the data set's default: Fashion-MNIST's own
    statistics for ``fashion_mnist``; for a folder or shards ImageNet's with 3 channels, 0.5 / 0.5 for
    grey-scale (``tests/test_eval_norm.py`` checks them against the loader's)."""
    from mimkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD
    from mimkit.data.loaders import _FASHION_NAMES  # the names build_dataset takes for Fashion-MNIST
    from mimkit.data.shards import is_shard_dir
    from mimkit.nn.vit import image_hw

    d, enc = cfg.data, cfg.model.encoder
    name = str(d.dataset)
    if name.lower() in _FASHION_NAMES and not is_shard_dir(name):
        default, what = (FASHION_MNIST_MEAN, FASHION_MNIST_STD), "Fashion-MNIST statistics"
    elif enc.in_chans == 3:
        default, what = (IMAGENET_MEAN, IMAGENET_STD), "ImageNet statistics"
    else:
        default, what = ((0.5,), (0.5,)), "grey-scale default 0.5 / 0.5"
    mean, std = tuple(d.mean or default[0]), tuple(d.std or default[1])
    if d.mean and d.std:
        origin = "data.mean / data.std"
    elif not d.mean and not d.std:
        origin = f"data.mean / data.std unset: the data set's default ({what})"
    else:
        origin = f"{'data.mean' if d.mean else 'data.std'} and the data set's default ({what}) for the other"
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "img_size": list(image_hw(enc.img_size)), "in_chans": int(enc.in_chans), "origin": origin}


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


class Checkpointer:
    """The checkpoints of one run in ``out_dir``.

    ``rebuild``: a fresh model of the run's method, into which rank 0 loads the gathered shards of a
    sharded run at its final save. Set :attr:`async_group` (a gloo process group) to write periodic
    DCP checkpoints asynchronously."""

    def __init__(self, cfg: Config, info: DistInfo, rebuild: Callable[[], nn.Module]):
        self.cfg, self.info = cfg, info
        self.out_dir = Path(cfg.train.out_dir)
        self.dcp = cfg.train.strategy == "fsdp"  # DCP directories instead of checkpoint.pt
        self._rebuild = rebuild
        self.lock: ckpt.RunLock | None = None
        self.created_dir = False  # this run created out_dir (removed again if it fails while empty)
        self.last_good: tuple[Path, int] | None = None
        self.last_save_time = time.monotonic()
        self.async_group = None  # the process group of asynchronous DCP writes (GPU)
        self.pending = None  # (future, step, trainer state) of an asynchronous DCP write
        self.full_method: nn.Module | None = None  # rank 0: the gathered model of a sharded run

    def warn(self, msg: str) -> None:
        if self.info.is_main:
            print(f"warning: {msg}", file=sys.stderr)

    # -- run directory ----------------------------------------------------------------------------
    def claim(self, model: nn.Module) -> None:
        """Rank 0: create and lock ``out_dir``, remove temp files of killed writers, check that a
        checkpoint of ``model`` fits. Every rank learns whether that worked before anything else
        happens (collective)."""
        err: BaseException | None = None
        if self.info.is_main:
            try:
                self.created_dir = not self.out_dir.exists()
                try:
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ckpt.CheckpointError(f"cannot create train.out_dir {self.out_dir}: {e.strerror}; free space "
                                               "or choose another train.out_dir") from e
                self.lock = ckpt.RunLock(self.out_dir).acquire()
                if self.lock.takeover:
                    self.warn(self.lock.takeover)
                n, size = ckpt.remove_stale_temp_files(self.out_dir)
                if n:
                    self.warn(f"removed {n} temporary file(s) ({size / 2**20:.1f} MiB) left by an interrupted run")
                n = ckpt.remove_stale_dcp_dirs(self.out_dir)
                if n:
                    self.warn(f"removed {n} incomplete sharded checkpoint director(y/ies) left by an interrupted run")
                adam_bytes = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
                need = ckpt.estimate_bytes(model.state_dict()) + int(1.02 * adam_bytes)
                ckpt.check_space(self.out_dir, need, "a checkpoint of this model")
            except (ckpt.CheckpointError, OSError) as e:
                err = e
        ok = all_ok(err is None, self.info)
        if err is not None:
            if isinstance(err, OSError):
                raise ckpt.CheckpointError(f"cannot use train.out_dir {self.out_dir}: {err}") from err
            raise err
        if not ok:
            raise ckpt.CheckpointError(f"rank 0 could not claim train.out_dir {self.out_dir}; see its error")

    def release(self, failed: bool = False) -> None:
        """Release the lock; remove ``out_dir`` when this run created it, ``failed`` and it is empty."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if failed and self.created_dir:
            self.created_dir = False
            try:
                self.out_dir.rmdir()  # only when empty
            except OSError:
                pass

    # -- saving -----------------------------------------------------------------------------------
    def state_dict(self, step: int, steps_per_epoch: int, nonfinite: int, scaler, model: nn.Module,
                   optimizer: torch.optim.Optimizer, rng: dict | None = None) -> dict:
        """What a checkpoint holds (collective when distributed: the ranks' RNG states are gathered).
        ``rng``: this rank's RNG state to store instead of the current one. ``train.strategy=fsdp``:
        every key but ``model`` and ``optimizer`` (those go to the DCP shards)."""
        rng = rng if rng is not None else ckpt.rng_state()
        if self.info.enabled:
            import torch.distributed as dist

            rngs: list = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        state = {
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": step / steps_per_epoch,
            "rng": rngs,
            "config": to_dict(self.cfg),
            "input": training_input(self.cfg),
            "extra": {"nonfinite": nonfinite, "world_size": self.info.world_size, "strategy": self.cfg.train.strategy},
        }
        if self.dcp:
            return state
        return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), **state}

    def save(self, step: int, state: Callable[[], dict], model: nn.Module, optimizer: torch.optim.Optimizer,
             final: bool = False, may_defer: bool = True) -> Path:
        """Write the checkpoint of ``step`` (collective; ``state()`` is called once, on every rank, and
        is collective itself). ``checkpoint.pt`` (and a numbered copy with ``train.keep_checkpoints``);
        a :class:`~mimkit.train.checkpoint.CheckpointError` on every rank when rank 0 could not write
        (the previous checkpoint is then intact). ``train.strategy=fsdp``: a DCP directory
        (:meth:`_save_dcp`; ``may_defer``: a periodic save that may be written asynchronously)."""
        if self.dcp:
            return self._save_dcp(step, state, model, optimizer, final, may_defer)
        full = state()
        latest = self.out_dir / ckpt.LATEST
        err: BaseException | None = None
        if self.info.is_main:
            try:
                ckpt.atomic_save(full, latest)
                ckpt.drop_newer(self.out_dir, step)
                keep = self.cfg.train.keep_checkpoints
                if keep:
                    ckpt.atomic_copy(latest, self.out_dir / ckpt.numbered_name(step))
                    ckpt.prune(self.out_dir, keep)
            except ckpt.CheckpointError as e:
                err = e
        ok = all_ok(err is None, self.info)
        if err is not None:
            raise err
        if not ok:
            raise ckpt.CheckpointError(f"rank 0 could not write the checkpoint {latest}; see its error")
        self.last_good = (latest, step)
        self.last_save_time = time.monotonic()
        return latest

    def _save_dcp(self, step: int, state: Callable[[], dict], model: nn.Module, optimizer: torch.optim.Optimizer,
                  final: bool, may_defer: bool) -> Path:
        """Every rank writes its shards of the model and optimizer with ``torch.distributed.checkpoint``
        into ``dcp/.step-<step>.tmp``; rank 0 then adds ``trainer.pt`` and renames the directory into
        place (:func:`~mimkit.train.checkpoint.finalize_dcp`). Periodic saves with an
        :attr:`async_group` are written asynchronously (``dcp.async_save``: training goes on while the
        staged copy is written; the next save, the final one or :meth:`wait_pending` waits for it); a
        stop signal's, a data error's and the final save are synchronous. The final save also writes
        ``encoder.safetensors`` (timm keys) gathered from the shards."""
        import warnings

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.finish_pending()
        trainer_state = state()  # collective (RNG states)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        shards = {"model": model_sd, "optimizer": optim_sd}
        tmp = ckpt.dcp_tmp_dir(self.out_dir, step)
        need = torch.tensor([float(ckpt.estimate_bytes(shards))])
        need = all_reduce_sum(need.to(self.info.device), self.info)
        err: BaseException | None = None
        if self.info.is_main:
            try:
                if tmp.exists():
                    import shutil

                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                ckpt.check_space(tmp.parent, int(need.item()) + ckpt.estimate_bytes(trainer_state),
                                 "a sharded checkpoint")
            except (ckpt.CheckpointError, OSError) as e:
                err = e
        if not all_ok(err is None, self.info):
            if err is not None:
                raise err if isinstance(err, ckpt.CheckpointError) else ckpt.CheckpointError(str(err))
            raise ckpt.CheckpointError(f"rank 0 could not prepare the checkpoint {tmp}; see its error")
        try:
            if self.async_group is not None and not final and may_defer:
                fut = dcp.async_save(shards, checkpoint_id=str(tmp), process_group=self.async_group)
                self.pending = (fut, step, trainer_state)
                self.last_save_time = time.monotonic()
                return tmp
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
                dcp.save(shards, checkpoint_id=str(tmp))
        except Exception as e:
            raise ckpt.CheckpointError(f"could not write the sharded checkpoint {tmp} ({_one_line(e)}); the previous "
                                       "checkpoint is intact") from e
        path = self._finalize_dcp(step, trainer_state)
        if final:
            self.export_consolidated(model)
        return path

    def _finalize_dcp(self, step: int, trainer_state: dict) -> Path:
        final_dir = self.out_dir / ckpt.DCP_DIR / ckpt.dcp_step_name(step)
        err: BaseException | None = None
        if self.info.is_main:
            try:
                ckpt.finalize_dcp(self.out_dir, step, trainer_state, self.cfg.train.keep_checkpoints)
            except (ckpt.CheckpointError, OSError) as e:
                err = e
        if not all_ok(err is None, self.info):
            if err is not None:
                raise err if isinstance(err, ckpt.CheckpointError) else ckpt.CheckpointError(str(err))
            raise ckpt.CheckpointError(f"rank 0 could not complete the checkpoint {final_dir}; see its error")
        self.last_good = (final_dir, step)
        self.last_save_time = time.monotonic()
        return final_dir

    def finish_pending(self) -> Path | None:
        """Wait for an asynchronous DCP write and complete it (collective)."""
        if self.pending is None:
            return None
        fut, step, trainer_state = self.pending
        self.pending = None
        try:
            fut.result()
        except Exception as e:
            raise ckpt.CheckpointError(f"the asynchronous write of the checkpoint of step {step} failed "
                                       f"({_one_line(e)}); the previous checkpoint is intact") from e
        return self._finalize_dcp(step, trainer_state)

    def wait_pending(self) -> None:
        """Let an asynchronous write still in flight (an error path left it) finish its thread; nothing
        is completed or raised (teardown)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            try:
                pending[0].result()
            except Exception:
                pass

    def export_consolidated(self, model: nn.Module) -> Path | None:
        """Gather the sharded model (collective) and, on rank 0, keep it for the end-of-run evaluation
        (:attr:`full_method`) and write ``encoder.safetensors`` with timm keys (``mimkit export``'s format)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        from mimkit.interop import export_encoder

        method = self._rebuild()
        method.load_state_dict(full)
        method.to(self.info.device).eval()
        self.full_method = method
        return export_encoder(method, self.out_dir / "encoder.safetensors", input=training_input(self.cfg))

    def seconds_since_save(self) -> float:
        return time.monotonic() - self.last_save_time

    def last_good_text(self) -> str:
        """A sentence naming the last good checkpoint (or saying that none was written yet)."""
        if self.last_good is not None and self.last_good[0].exists():  # a file, or a DCP directory
            return f"The last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})"
        return (f"No checkpoint was written yet (the first is due at step {self.cfg.train.ckpt_every_steps}; "
                "lower train.ckpt_every_steps to save earlier)")
