"""The decode-on-device input path (mimkit.data.gpu), run on CPU: the same code decodes with
torchvision's CPU decoder there; nvJPEG itself is exercised by `mimkit bench` on a GPU."""

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.config import ConfigError, load_config, validate
from mimkit.data import FolderLoader, build_dataset, build_loader
from mimkit.data.augment import rrc_params
from mimkit.data.gpu import JpegBatchLoader, codecs, crop_boxes, gpu_decode_available, resolve_decode
from mimkit.errors import DataError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _folder(root, n=12, sizes=((40, 30), (30, 40), (48, 48))):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i:03d}.{'png' if i == 5 else 'jpg'}", quality=95)
    return root


def _loader(root, **kw):
    args = dict(out_size=16, mean=MEAN, std=STD, num_workers=0, device="cpu", seed=3)
    args.update(kw)
    return JpegBatchLoader(root, 4, **args)


def test_no_gpu_decoder_falls_back_or_says_how_to_fix():
    cpu = torch.device("cpu")
    assert not gpu_decode_available(cpu)
    assert resolve_decode("auto", cpu) == "cpu" and resolve_decode("cpu", cpu) == "cpu"
    with pytest.raises(ConfigError, match=r"data.decode=gpu but cpu is not a CUDA device; use data.decode=cpu"):
        resolve_decode("gpu", cpu)
    with pytest.raises(ConfigError, match="data.decode='nvjpeg' is not one of cpu, gpu, auto"):
        resolve_decode("nvjpeg", cpu)
    with pytest.raises(ConfigError, match="data.decode"):
        validate(load_config(None, ["data.decode=fast"]))


def test_build_loader_auto_keeps_the_pil_workers_where_no_gpu_decoder_exists(tmp_path):
    ds = build_dataset(_folder(tmp_path / "img"), "train")
    loader = build_loader(ds, 4, out_size=16, num_workers=0, decode="auto", device="cpu")
    assert isinstance(loader, FolderLoader)
    with pytest.raises(ConfigError, match="data.decode=gpu but"):
        build_loader(ds, 4, out_size=16, num_workers=0, decode="gpu", device="cpu")


def test_crop_boxes_equal_the_batched_rrc_rule_for_equal_sizes():
    for h, w, scale, ratio in [(30, 40, (0.2, 1.0), (3 / 4, 4 / 3)), (10, 100, (0.9, 1.0), (1.0, 1.0)),
                               (100, 10, (0.9, 1.0), (1.0, 1.0))]:  # the last two: center-crop fallback
        a = crop_boxes([h] * 64, [w] * 64, scale, ratio, torch.Generator().manual_seed(7))
        b = rrc_params(64, h, w, scale, ratio, torch.Generator().manual_seed(7))
        assert a == tuple(t.tolist() for t in b)
    top, left, hh, ww = crop_boxes([30, 80], [40, 20], (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    for t, lf, ch, cw, H, W in zip(top, left, hh, ww, [30, 80], [40, 20]):
        assert 0 <= t and t + ch <= H and 0 <= lf and lf + cw <= W and ch > 0 and cw > 0


def test_batches_are_deterministic_resumable_and_normalized(tmp_path):
    root = _folder(tmp_path / "img")
    full = list(_loader(root).iter_from(1))
    again = list(_loader(root).iter_from(1))
    assert len(full) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(full, again))
    assert full[0][0].shape == (4, 3, 16, 16) and full[0][0].dtype == torch.float32
    tail = list(_loader(root).iter_from(1, 2))
    assert torch.equal(tail[0][0], full[2][0]) and torch.equal(tail[0][1], full[2][1])
    assert not torch.equal(list(_loader(root).iter_from(2))[0][0], full[0][0])  # a new epoch, a new order
    # no crop, no flip, output = input size: exactly the decoded pixels, normalized
    one = _folder(tmp_path / "sq", n=4, sizes=((16, 16),))
    x, _ = next(iter(_loader(one, augment="none", shuffle=False)))
    decode_image = codecs()[2]
    ref = torch.stack([decode_image(torch.frombuffer(bytearray((one / f"{i:03d}.jpg").read_bytes()), dtype=torch.uint8), mode="RGB") for i in range(4)]).float() / 255
    ref = (ref - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)


def test_grey_mode_png_and_labels(tmp_path):
    root = tmp_path / "lab"
    for c in ("a", "b"):
        _folder(root / c, n=4)
    loader = JpegBatchLoader(root, 4, out_size=8, mean=(0.5,), std=(0.5,), num_workers=0, device="cpu", mode="L",
                             shuffle=False)
    batches = list(loader)
    assert batches[0][0].shape == (4, 1, 8, 8)
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_corrupt_file_is_named_or_skipped(tmp_path):
    root = _folder(tmp_path / "img", n=8)
    (root / "003.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=r"corrupt or unreadable image: .*003.jpg.*data.skip_corrupt=true"):
        list(_loader(root, shuffle=False))
    loader = _loader(root, shuffle=False, skip_corrupt=True)
    batches = list(loader)
    assert len(batches) == 2 and list(loader.skipped) == [str(root / "003.jpg")]
    assert torch.isfinite(batches[0][0]).all()


def test_background_decoding_gives_the_same_batches_and_stops_cleanly(tmp_path):
    import threading

    root = _folder(tmp_path / "img")
    threaded = list(_loader(root).iter_from(0))  # prefetch=2 (default): a decoding thread
    inline = list(_loader(root, prefetch=0).iter_from(0))
    assert len(threaded) == len(inline) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(threaded, inline))
    it = _loader(root).iter_from(0)
    next(it)
    it.close()  # a consumer that stops early ends the thread
    assert not any(t.name == "mimkit-decode" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loading_leaves_the_global_rng_alone(tmp_path, prefetch):
    # masking draws from the global RNG and a resume restores it: the loader (its DataLoader's base
    # seed, drawn in the decoding thread) must not take numbers from it, or a resumed run diverges
    root = _folder(tmp_path / "img")
    loader = _loader(root, prefetch=prefetch)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    list(loader.iter_from(0, 1))
    assert torch.equal(torch.get_rng_state(), before)


def test_gpu_probe_falls_back_to_torchvision_when_torchcodec_cannot_take_the_call(monkeypatch):
    import mimkit.data.gpu as gpu

    def torchcodec_jpeg(data, mode, device):
        raise TypeError("decode_jpeg() got an unexpected keyword argument")

    calls = []
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "_torchcodec", lambda: ("torchcodec", torchcodec_jpeg, None))
    monkeypatch.setattr(gpu, "_torchvision",
                        lambda: ("torchvision", lambda d, mode, device: calls.append(device), None))
    monkeypatch.setattr(gpu, "_CHOSEN", [])
    gpu._probe.cache_clear()
    try:
        assert gpu.resolve_decode("auto", "cuda:0") == "gpu" and calls == ["cuda:0"]
        assert gpu.codecs()[0] == "torchvision"
    finally:
        gpu._probe.cache_clear()
