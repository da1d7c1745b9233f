"""Image folders decoded on the GPU: nvJPEG through ``decode_jpeg(list_of_files, device="cuda")`` of
TorchCodec (``pip install torchcodec``, optional; the successor of torchvision's image decoders) or,
without it, torchvision's (deprecated since 0.29, same call); then random-resized-crop + flip +
normalize on the device (``data.decode=gpu``).

Worker processes only read file bytes (no decoding on the CPU); the main process hands a whole batch
of JPEG byte strings to nvJPEG, crops and resizes each decoded image on the device (bilinear with
antialiasing, the crop boxes drawn on the host with torchvision's ``RandomResizedCrop`` rule from a
generator seeded by ``(seed, epoch, batch, rank)``), flips and normalizes the batch. Files nvJPEG
cannot take (PNG, CMYK JPEGs) are decoded by ``torchvision.io.decode_image`` on the CPU and copied
over. Where no GPU decoder exists (no CUDA, or a build without nvJPEG)
:func:`resolve_decode` says so in one line; ``data.decode=auto`` then keeps the PIL worker path.

The loader follows the :class:`~mimkit.data.spec.Loader` protocol as :class:`~mimkit.data.FolderLoader`
does (``iter_from``, ``set_epoch``, ``skipped``, ``close``) with its sample order
(:func:`~mimkit.data.common.shard_indices`), so resuming
mid-epoch replays the same batches. ``device="cpu"`` runs the same pipeline with the CPU decoder
(used by the tests).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from mimkit.errors import ConfigError, DataError

from .common import check_shard, mix_seed, num_batches, shard_indices, shutdown_workers, worker_signals
from .folder import ImageFolder, open_image_checked
from .spec import LoaderSpec

__all__ = ["DECODE_CHOICES", "JpegBatchLoader", "crop_boxes", "gpu_decode_available", "resolve_decode"]

DECODE_CHOICES = ("cpu", "gpu", "auto")


def _torchcodec():
    from torchcodec.decoders import decode_image, decode_jpeg

    return "torchcodec", decode_jpeg, decode_image


def _torchvision():
    import warnings

    from torchvision.io import decode_image, decode_jpeg

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
    return "torchvision", decode_jpeg, decode_image


_CHOSEN: list = []  # the decoders _probe found working on the GPU (TorchCodec's may not take this call)


@functools.cache
def _default_codecs():
    try:
        return _torchcodec()
    except Exception:  # not installed, or its native libraries do not load here
        return _torchvision()


def codecs():
    """``(name, decode_jpeg, decode_image)``: TorchCodec's decoders when installed, else torchvision's
    (also when TorchCodec's failed the GPU probe and torchvision's passed it). Both take
    ``mode="RGB" | "GRAY"``, a list of byte tensors and ``device`` for ``decode_jpeg``."""
    return _CHOSEN[0] if _CHOSEN else _default_codecs()


@functools.cache
def _probe(device: str) -> str | None:
    """``None`` when TorchCodec or torchvision decodes a JPEG on ``device``, else why not."""
    if not device.startswith("cuda"):
        return f"{device} is not a CUDA device"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    why = []
    for name, load in (("torchcodec", _torchcodec), ("torchvision", _torchvision)):
        try:
            found = load()
        except ImportError as e:
            if name == "torchvision":
                why.append(f"torchvision's image decoders do not load ({e})")
            continue
        try:
            found[1]([data], mode="RGB", device=device)
        except Exception as e:  # a build without nvJPEG, driver problems, another signature
            first = (str(e).splitlines() or [""])[0][:120]
            why.append(f"{name} cannot decode JPEG on {device} ({type(e).__name__}: {first})")
            continue
        _CHOSEN[:] = [found]
        return None
    return "; ".join(why)


def gpu_decode_available(device: torch.device | str) -> bool:
    """True when nvJPEG decoding (TorchCodec or torchvision) works on ``device``."""
    return _probe(str(torch.device(device))) is None


def resolve_decode(decode: str, device: torch.device | str) -> str:
    """``"cpu"`` or ``"gpu"`` for ``data.decode`` on ``device``; ``auto`` picks ``gpu`` where it works.

    Raises:
        ConfigError: ``decode="gpu"`` where no GPU decoder works, or an unknown choice.
    """

    if decode not in DECODE_CHOICES:
        raise ConfigError(f"data.decode={decode!r} is not one of {', '.join(DECODE_CHOICES)}; e.g. data.decode=cpu")
    if decode == "cpu":
        return "cpu"
    why = _probe(str(torch.device(device)))
    if why is None:
        return "gpu"
    if decode == "auto":
        return "cpu"
    raise ConfigError(f"data.decode=gpu but {why}; use data.decode=cpu (PIL worker processes) or auto")


def crop_boxes(
    heights: Sequence[int],
    widths: Sequence[int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[list[int], list[int], list[int], list[int]]:
    """torchvision ``RandomResizedCrop`` boxes for images of different sizes, drawn at once on the CPU.

    Per image: 10 candidates (area ``U(scale) * H * W``, log-uniform aspect ``w / h`` in ``ratio``); the
    first that fits is used with a uniform position, else the largest center crop with the aspect
    clamped to ``ratio``. Returns python lists ``top, left, h, w`` (host values: no device sync)."""
    hs = torch.tensor(heights, dtype=torch.float64)
    ws = torch.tensor(widths, dtype=torch.float64)
    n = len(heights)
    rnd = torch.rand(4, n, 10, generator=generator, dtype=torch.float64)
    area = (hs * ws)[:, None] * (scale[0] + (scale[1] - scale[0]) * rnd[0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * rnd[1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= ws[:, None]) & (h > 0) & (h <= hs[:, None])
    first = ok.to(torch.uint8).argmax(1, keepdim=True)
    any_ok = ok.any(1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    u_top, u_left = rnd[2].gather(1, first)[:, 0], rnd[3].gather(1, first)[:, 0]
    # fallback: the whole image, cut to the nearest allowed aspect ratio, centered
    in_ratio = ws / hs
    fw = torch.where(in_ratio < ratio[0], ws, torch.where(in_ratio > ratio[1], torch.round(hs * ratio[1]), ws))
    fh = torch.where(in_ratio < ratio[0], torch.round(ws / ratio[0]), hs)
    w = torch.where(any_ok, w, fw).long()
    h = torch.where(any_ok, h, fh).long()
    hs_l, ws_l = hs.long(), ws.long()
    top = torch.where(any_ok, torch.minimum(torch.floor(u_top * (hs_l - h + 1)).long(), hs_l - h), (hs_l - h) // 2)
    left = torch.where(any_ok, torch.minimum(torch.floor(u_left * (ws_l - w + 1)).long(), ws_l - w), (ws_l - w) // 2)
    return top.tolist(), left.tolist(), h.tolist(), w.tolist()


class _BytesDataset(torch.utils.data.Dataset):
    """``(file bytes as a uint8 tensor, label, path)``: workers only read files."""

    def __init__(self, folder: ImageFolder):
        self.samples = folder.samples
        self.max_pixels = getattr(folder, "max_pixels", None)  # the folder's own limit, as on the CPU path

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            data = path.read_bytes()
        except OSError as e:
            return torch.empty(0, dtype=torch.uint8), label, f"{path}|{e.strerror or e}"
        try:  # the pixel limit of every reader (mimkit.data.folder.MAX_PIXELS), from the header alone
            open_image_checked(io.BytesIO(data), str(path), self.max_pixels).close()
        except DataError as e:
            return torch.empty(0, dtype=torch.uint8), label, f"{path}|{e}"
        except Exception:
            pass  # a header PIL cannot parse: the decoder below decides whether the file is corrupt
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, str(path)


def _collate(items):
    return [i[0] for i in items], torch.tensor([i[1] for i in items], dtype=torch.int64), [i[2] for i in items]


class _BatchSampler(torch.utils.data.Sampler):
    def __init__(self, loader: JpegBatchLoader):
        self.loader = loader

    def __iter__(self):
        lo = self.loader
        idx = lo.indices(lo._epoch)
        for i in range(lo._start, len(lo)):
            yield idx[i * lo.batch_size:(i + 1) * lo.batch_size].tolist()

    def __len__(self) -> int:
        return len(self.loader) - self.loader._start


class JpegBatchLoader:
    """Batches from an image folder, decoded on ``device`` (nvJPEG on CUDA) and augmented there.

    Args:
        folder: an :class:`~mimkit.data.ImageFolder` or a path.
        batch_size, spec, settings: a :class:`~mimkit.data.spec.LoaderSpec` (``spec``, and keyword
            arguments named like its fields, which replace the spec's; without a spec ``device``
            defaults to ``"cuda"``); of its fields:
        batch_size: per-rank batch size.
        out_size: output side ``S`` or ``(S_h, S_w)``.
        mean, std: normalization statistics for images in ``[0, 1]``.
        augment: ``"rrc_flip"`` (RandomResizedCrop + flip), ``"flip"`` (resize the shorter side, center
            crop, flip) or ``"none"`` (resize + center crop).
        scale, ratio, flip_p: crop and flip parameters.
        num_workers: processes that read file bytes (0 = the main process).
        prefetch_factor: batches of file bytes each worker reads ahead (default 4).
        prefetch: decoded batches a background thread makes ahead (0: decode in the caller's thread).
        device: where images are decoded and batches produced.
        shuffle, drop_last, seed, rank, world_size: as :class:`~mimkit.data.FolderLoader`.
        skip_corrupt: replace an undecodable file by the batch's previous good image (recorded in
            :attr:`skipped`) instead of raising :class:`DataError`.
        (``pin_memory`` does not apply.) Besides: ``prefetch``, ``labeled``, ``mode``.

    Yields ``images (B, C, S_h, S_w) float32`` normalized and ``labels (B,) int64`` on ``device``.
    """

    streaming = True

    def __init__(
        self,
        folder: ImageFolder | str | os.PathLike[str],
        batch_size: int | None = None,
        *,
        spec: LoaderSpec | None = None,
        prefetch: int = 2,
        labeled: bool | Literal["auto"] = "auto",
        mode: Literal["RGB", "L"] = "RGB",
        **settings: Any,
    ) -> None:
        sp = self.spec = LoaderSpec.resolve("JpegBatchLoader", batch_size, spec, settings, defaults={"device": "cuda"},
                                            needs=("mean", "std", "out_size"))
        batch_size, out_size, mean, std, augment = sp.batch_size, sp.out_size, sp.mean, sp.std, sp.augment
        scale, ratio, flip_p, num_workers, device = sp.scale, sp.ratio, sp.flip_p, sp.num_workers, sp.device
        prefetch_factor = sp.prefetch_factor or 4
        shuffle, drop_last, seed, rank, world_size = sp.shuffle, sp.drop_last, sp.seed, sp.rank, sp.world_size
        skip_corrupt = sp.skip_corrupt
        check_shard(batch_size, rank, world_size)
        if augment not in ("rrc_flip", "flip", "none"):
            raise ValueError(f"augment must be 'rrc_flip', 'flip' or 'none', got {augment!r}")
        if not isinstance(folder, ImageFolder):
            folder = ImageFolder(folder, labeled=labeled, mode=mode, skip_corrupt=skip_corrupt)
        self.folder = folder
        self.batch_size = batch_size
        self.out_hw = (int(out_size), int(out_size)) if isinstance(out_size, int) else tuple(int(s) for s in out_size)
        self.augment, self.scale, self.ratio, self.flip_p = augment, tuple(scale), tuple(ratio), flip_p
        self.device = torch.device(device)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.skip_corrupt = skip_corrupt or folder.skip_corrupt
        self.channels = folder.in_chans
        self.mean = torch.tensor([float(m) for m in mean], device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor([float(s) for s in std], device=self.device).view(1, -1, 1, 1)
        self.skipped: dict[str, None] = {}
        self.prefetch = prefetch
        self.epoch = 0
        self._epoch = 0
        self._start = 0
        workers = dict(persistent_workers=True, prefetch_factor=prefetch_factor) if num_workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(
            _BytesDataset(folder), batch_sampler=_BatchSampler(self), num_workers=num_workers, collate_fn=_collate,
            worker_init_fn=worker_signals if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # worker base seeds; never the global RNG
            **workers)
        if len(self) == 0:
            raise ValueError(f"no batches: fewer samples per rank than batch_size {batch_size} with drop_last=True; "
                             "lower batch_size or pass drop_last=False")

    # -- order ------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        n = len(self.folder)
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    def indices(self, epoch: int) -> torch.Tensor:
        return shard_indices(len(self.folder), epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                             drop_last=self.drop_last, rank=self.rank, world_size=self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def close(self) -> None:
        """End the worker processes now."""
        shutdown_workers(self.loader)

    # -- decoding ---------------------------------------------------------------------------------
    def _decode_one(self, data: torch.Tensor, path: str) -> torch.Tensor | None:
        decode_image = codecs()[2]
        mode = "RGB" if self.channels == 3 else "GRAY"
        try:
            if data.numel() == 0:
                raise RuntimeError(path.split("|", 1)[-1] if "|" in path else "empty file")
            return decode_image(data, mode=mode).to(self.device, non_blocking=True)
        except Exception as e:
            name = path.split("|", 1)[0]
            if not self.skip_corrupt:
                why = (str(e).splitlines() or [""])[0][:120]  # one line
                raise DataError(f"corrupt or unreadable image: {name} ({type(e).__name__}: {why}). Delete or "
                                "replace the file, or set data.skip_corrupt=true to skip such files.") from e
            self.skipped[name] = None
            return None

    def decode(self, datas: list[torch.Tensor], paths: list[str]) -> list[torch.Tensor]:
        """uint8 ``(C, H, W)`` images on ``device``; one nvJPEG call for the batch's JPEG files."""
        decode_jpeg = codecs()[1]
        mode = "RGB" if self.channels == 3 else "GRAY"
        out: list[torch.Tensor | None] = [None] * len(datas)
        jpeg = [i for i, d in enumerate(datas) if d.numel() > 2 and d[0] == 0xFF and d[1] == 0xD8]
        if jpeg and self.device.type == "cuda":
            try:
                dec = decode_jpeg([datas[i] for i in jpeg], mode=mode, device=self.device)
                for i, img in zip(jpeg, dec):
                    out[i] = img
            except RuntimeError:
                pass  # a file nvJPEG rejects: every image of the batch goes through the per-file path
        for i, img in enumerate(out):
            if img is None:
                out[i] = self._decode_one(datas[i], paths[i])
        good = [o for o in out if o is not None]
        if not good:
            raise DataError(f"no image of a batch could be decoded (first: {paths[0].split('|', 1)[0]})")
        last = good[0]
        filled = []
        for o in out:  # a skipped file is replaced by the previous good image of the batch
            last = o if o is not None else last
            filled.append(last)
        return filled

    def transform(self, images: list[torch.Tensor], g: torch.Generator) -> torch.Tensor:
        """Decoded uint8 images of any sizes -> normalized float32 ``(B, C, S_h, S_w)``."""
        sh, sw = self.out_hw
        hs = [int(i.shape[-2]) for i in images]
        ws = [int(i.shape[-1]) for i in images]
        if self.augment == "rrc_flip":
            top, left, h, w = crop_boxes(hs, ws, self.scale, self.ratio, g)
        else:  # resize the shorter side to the output, center crop (the box in input pixels)
            h, w, top, left = [], [], [], []
            for H, W in zip(hs, ws):
                s = min(H / sh, W / sw)
                ch, cw = min(H, round(sh * s)), min(W, round(sw * s))
                h.append(ch), w.append(cw), top.append((H - ch) // 2), left.append((W - cw) // 2)
        out = torch.empty(len(images), self.channels, sh, sw, device=self.device)
        for k, img in enumerate(images):
            crop = img[None, :, top[k]:top[k] + h[k], left[k]:left[k] + w[k]].float()
            out[k] = F.interpolate(crop, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)[0]
        if self.augment in ("rrc_flip", "flip") and self.flip_p > 0:
            flip = (torch.rand(len(images), generator=g) < self.flip_p).to(self.device, non_blocking=True)
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return (out.div_(255) - self.mean) / self.std

    def generator(self, epoch: int, batch_index: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed("gpu-augment", self.seed, epoch, batch_index, self.rank))

    def _produce(self, epoch: int, start_batch: int):
        self._epoch, self._start = int(epoch), start_batch
        for b, (datas, labels, paths) in enumerate(self.loader, start=start_batch):
            images = self.decode(datas, paths)
            yield self.transform(images, self.generator(epoch, b)), labels.to(self.device, non_blocking=True)

    def iter_from(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch, ..., len(self) - 1`` of ``epoch`` (the tail of a full pass).

        With ``prefetch`` > 0 the batches are made by a background thread (on its own CUDA stream on a
        GPU), up to ``prefetch`` ahead, so decoding overlaps the training step; the batches are the
        same either way."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        if self.prefetch <= 0:
            yield from self._produce(epoch, start_batch)
            return
        import queue
        import threading

        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    for x, y in self._produce(epoch, start_batch):
                        event = None
                        if cuda:
                            event = torch.cuda.Event()
                            event.record(stream)
                        if not put((x, y, event)):
                            return
                put(None)
            except BaseException as e:  # handed to the consumer, raised there (DataError names the file)
                put(e)

        thread = threading.Thread(target=work, name="mimkit-decode", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                x, y, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    x.record_stream(current)
                    y.record_stream(current)
                yield x, y
        finally:
            stop.set()
            thread.join(timeout=10)

    def __iter__(self):
        return self.iter_from(self.epoch, 0)
