"""Folders and shard directories never multiply, escape or silently discard data (issue 20, item 3).

Crafted inputs: symbolic-link loops, links to folders and files outside the root, hidden files, nested
class folders, corrupt files, PNG headers claiming huge sizes, shard indices naming ``../x.tar`` or
``/etc/passwd``, offset tables pointing outside their tar."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import DataError, ImageFolder
from mimkit.data import folder as folder_mod
from mimkit.data.folder import MAX_PIXELS, load_folder_to_tensor, resolve_max_pixels, scan_images
from mimkit.data.shards import ShardIndex, ShardLoader, prepare_shards

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")


def _png(path: Path, value: int, size: tuple[int, int] = (6, 5)) -> Path:
    """A small RGB PNG filled with ``value`` (its identity)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width x height`` (the data is one row: it never decodes in full)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey-scale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
            + chunk(b"IEND", b""))


def _rel(paths, root: Path) -> list[str]:
    return [str(Path(p).relative_to(root)) for p in paths]


# -- scanning: links ------------------------------------------------------------------------------


@needs_symlinks
def test_a_link_loop_is_not_followed_and_is_read_once_when_following(tmp_path: Path, capsys) -> None:
    """The hostile tester's folder: 33 files and a link back to the root (33 files became 1,353)."""
    root = tmp_path / "imgs"
    for i in range(33):
        _png(root / f"sub{i % 3}" / f"{i:02d}.png", i)
    os.symlink(root, root / "sub0" / "loop")  # root/sub0/loop -> root
    os.symlink("..", root / "sub1" / "up")  # relative link to the root as well

    ds = ImageFolder(root, labeled=False)
    assert len(ds) == 33
    assert sorted(_rel((p for p, _ in ds.samples), root)) == sorted(
        f"sub{i % 3}/{i:02d}.png" for i in range(33))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 2 symbolic link(s)" in err and "follow_links=True" in err
    assert "--follow-links" in err and ds.scan_counts["skipped_links"] == 2

    followed = ImageFolder(root, labeled=False, follow_links=True)
    assert [p for p, _ in followed.samples] == [p for p, _ in ds.samples]  # the loops add nothing
    assert followed.scan_counts["repeated"] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 link(s) to a directory or file already read" in err

    # reported once per process: opening the same folder again prints nothing new
    ImageFolder(root, labeled=False)
    assert capsys.readouterr().err == ""


@needs_symlinks
def test_links_outside_the_root_are_never_followed(tmp_path: Path, capsys) -> None:
    outside = tmp_path / "outside"
    _png(outside / "secret.png", 200)
    _png(outside / "dir" / "a.png", 201)
    root = tmp_path / "root"
    _png(root / "cat" / "1.png", 1)
    _png(root / "dog" / "2.png", 2)
    os.symlink(outside / "secret.png", root / "cat" / "secret.png")  # file link out
    os.symlink(outside / "dir", root / "dog" / "dir")  # directory link out
    os.symlink(outside / "dir", root / "bird")  # a whole class folder out
    os.symlink(root / "cat" / "1.png", root / "dog" / "dup.png")  # file link inside: a duplicate
    os.symlink(tmp_path / "nowhere", root / "cat" / "broken.png")

    for follow in (False, True):
        ds = ImageFolder(root, follow_links=follow)
        assert ds.classes == ["cat", "dog"]
        assert [(str(p.relative_to(root)), y) for p, y in ds.samples] == [("cat/1.png", 0), ("dog/2.png", 1)]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "skipped 5 symbolic link(s)" in err[0]
    assert ("3 link(s) leading outside the folder" in err[1] and "1 link(s) to a directory or file already read"
            in err[1] and "1 broken link(s)" in err[1])
    followed = scan_images(root, follow_links=True)
    assert followed.counts == {"skipped_links": 0, "outside_links": 3, "repeated": 1, "broken_links": 1,
                               "unreadable_dirs": 0}
    # an outside target reached through a chain of links (link -> link -> outside) is refused too
    os.symlink(root / "bird", root / "cat" / "chain")
    assert scan_images(root, follow_links=True).outside_links == 4


@needs_symlinks
def test_following_links_inside_the_root(tmp_path: Path) -> None:
    """Links that stay inside are read, each real directory and file once, at the first place reached."""
    root = tmp_path / "root"
    _png(root / ".pool" / "x.png", 10)  # hidden: only reachable through links
    _png(root / ".pool" / "y.png", 11)
    _png(root / "a" / "1.png", 1)
    os.symlink(root / ".pool", root / "a" / "pool")
    os.symlink(root / ".pool" / "x.png", root / "b.png")  # file link into the pool: read first (top files)
    ds = ImageFolder(root, labeled=False, follow_links=True)
    assert _rel((p for p, _ in ds.samples), root) == ["b.png", "a/1.png", "a/pool/y.png"]  # x once, as b.png
    assert ImageFolder(root, labeled=False).samples == [(root / "a" / "1.png", -1)]
    # the root itself may be a link
    os.symlink(root, tmp_path / "alias")
    alias = ImageFolder(tmp_path / "alias", labeled=False, follow_links=True)
    assert _rel((p for p, _ in alias.samples), tmp_path / "alias") == ["b.png", "a/1.png", "a/pool/y.png"]


@needs_symlinks
def test_only_links_no_images_says_how_to_follow(tmp_path: Path) -> None:
    real = tmp_path / "real"
    _png(real / "1.png", 1)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(real / "1.png", root / "1.png")
    with pytest.raises(DataError, match=r"no images found .*1 symbolic link\(s\) were skipped.*follow_links=True"):
        ImageFolder(root)


def test_non_regular_files_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _png(root / "1.png", 1)
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.png")  # opening it would block forever
    assert ImageFolder(root).samples == [(root / "1.png", -1)]


# -- data prepare writes exactly what the folder reader reads -------------------------------------


def _shard_members(out: Path) -> list[tuple[bytes, int]]:
    """``(image bytes, label)`` of every sample in the shard directory, in index order, read through
    the tars' own member names (not the offset tables) and checked against the tables."""
    index = json.loads((out / "index.json").read_text())
    got = []
    for sh in index["shards"]:
        table = np.load(out / sh["name"].replace(".tar", ".idx.npy"))
        with tarfile.open(out / sh["name"]) as tar:
            members = [m for m in tar.getmembers() if not m.name.endswith(".cls")]
            labels = {m.name.split(".")[0]: int(tar.extractfile(m).read()) for m in tar.getmembers()
                      if m.name.endswith(".cls")}
            assert len(members) == len(table) == sh["samples"]
            for m, (off, size, label) in zip(members, table.tolist()):
                assert (m.offset_data, m.size) == (off, size)
                assert labels.get(m.name.split(".")[0], -1) == label
                got.append((tar.extractfile(m).read(), label))
    assert len(got) == index["num_samples"]
    return got


@needs_symlinks
@pytest.mark.parametrize("follow", [False, True])
def test_prepare_writes_exactly_what_the_folder_reader_reads(tmp_path: Path, follow: bool, capsys) -> None:
    from mimkit.cli import main

    outside = tmp_path / "outside"
    _png(outside / "o.png", 250)
    src = tmp_path / "src"
    v = 0
    for cls in ("ant", "bee", "cow"):
        for sub in ("", "deep/er"):
            for k in range(2):
                v += 1
                _png(src / cls / sub / f"{k}.png", v)
    (src / "bee" / ".hidden.png").write_bytes((src / "bee" / "0.png").read_bytes())
    _png(src / ".git" / "x.png", 99)
    (src / "cow" / "bad.png").write_bytes(b"not a png")  # corrupt
    os.symlink(src, src / "ant" / "deep" / "loop")  # loop
    os.symlink(outside, src / "bee" / "out")  # outside folder
    os.symlink(outside / "o.png", src / "cow" / "o.png")  # outside file
    os.symlink(src / "ant" / "0.png", src / "cow" / "z_dup.png")  # duplicate inside

    ref = ImageFolder(src, skip_corrupt=True, follow_links=follow)
    assert ref.classes == ["ant", "bee", "cow"]
    assert len(ref) == 13  # 12 images + the corrupt one (dropped below)
    assert ref.verify() == [src / "cow" / "bad.png"]
    expected = [(p.read_bytes(), y) for p, y in ref.samples]
    assert len(expected) == 12 and [y for _, y in expected] == [0] * 4 + [1] * 4 + [2] * 4
    warned = capsys.readouterr().err  # the scan's one line (prepare's own scan repeats it: not printed again)
    assert warned.count("\n") == 1
    assert ("2 link(s) leading outside" in warned) if follow else ("skipped 4 symbolic link(s)" in warned)

    out = tmp_path / "shards"
    argv = ["data", "prepare", str(src), str(out), "--shard-size", "5", "--skip-corrupt", "--quiet"]
    assert main(argv + (["--follow-links"] if follow else [])) == 0
    captured = capsys.readouterr()
    assert _shard_members(out) == expected  # same files, same order, same labels
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == [str(src / "cow" / "bad.png")] and index["classes"] == ["ant", "bee", "cow"]
    assert index["follow_links"] is follow
    if follow:
        assert index["scan"] == {"skipped_links": 0, "outside_links": 2, "repeated": 2, "broken_links": 0,
                                 "unreadable_dirs": 0}
    else:
        assert index["scan"]["skipped_links"] == 4
    assert captured.err == ""
    assert "wrote 12 RGB images" in captured.out

    # and the loader reads those 12 back in the same order (labels travel with them)
    ld = ShardLoader(out, 4, out_size=6, mean=(0.0,) * 3, std=(1.0,) * 3, augment="none", num_workers=0,
                     shuffle=False)
    ys = [y for _, yb in ld for y in yb.tolist()]
    assert ys == [0] * 4 + [1] * 4 + [2] * 4


def test_prepare_without_skip_corrupt_names_the_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "a.png", 1)
    (src / "b.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"corrupt or unreadable image: .*b\.png"):
        prepare_shards(src, tmp_path / "out", progress=False)


# -- one pixel limit everywhere ------------------------------------------------------------------


def test_pixel_limit_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIMKIT_MAX_PIXELS", raising=False)
    assert resolve_max_pixels() == MAX_PIXELS == 89_478_485
    assert resolve_max_pixels(10) == 10 and resolve_max_pixels(0) == 0
    monkeypatch.setenv("MIMKIT_MAX_PIXELS", "200_000_000")
    assert resolve_max_pixels() == 200_000_000 and resolve_max_pixels(5) == 5
    monkeypatch.setenv("MIMKIT_MAX_PIXELS", "1e9")
    assert resolve_max_pixels() == 10**9
    monkeypatch.setenv("MIMKIT_MAX_PIXELS", "lots")
    with pytest.raises(DataError, match="MIMKIT_MAX_PIXELS must be a whole number.*'lots'"):
        resolve_max_pixels()
    with pytest.raises(DataError, match="max_pixels must be a whole number"):
        resolve_max_pixels(-1)


def test_header_bomb_is_refused_before_decoding_by_the_folder_reader_and_prepare(tmp_path: Path) -> None:
    """A PNG claiming 13000 x 13000 = 169 megapixels (the tester's case) is refused from its header."""
    src = tmp_path / "src"
    _png(src / "a.png", 1)
    (src / "bomb.png").write_bytes(_bomb_png(13000, 13000))
    ds = ImageFolder(src)
    with pytest.raises(DataError) as e:
        ds.load(1)
    msg = str(e.value)
    assert "\n" not in msg and f"{src / 'bomb.png'} is 13000x13000 = 169000000 pixels" in msg
    assert f"over the limit of {MAX_PIXELS} pixels" in msg and "MIMKIT_MAX_PIXELS=169000000" in msg
    assert "--max-pixels" in msg
    assert ImageFolder(src, skip_corrupt=True).verify() == [src / "bomb.png"]
    with pytest.raises(DataError, match=r"bomb\.png is 13000x13000"):
        prepare_shards(src, tmp_path / "out", progress=False)
    index = prepare_shards(src, tmp_path / "out2", skip_corrupt=True, progress=False)
    assert index["num_samples"] == 1 and index["skipped"] == [str(src / "bomb.png")]
    # raising the limit lets such a file through (a smaller one here: PIL pads the missing rows)
    (src / "bomb.png").write_bytes(_bomb_png(300, 200))
    with pytest.raises(DataError, match=r"bomb\.png is 300x200 = 60000 pixels .*over the limit of 59999 pixels"):
        ImageFolder(src, max_pixels=59_999).load(1)
    assert ImageFolder(src, max_pixels=60_000).load(1)[0].size == (300, 200)
    assert ImageFolder(src, max_pixels=0).load(1)[0].size == (300, 200)
    # the same limit for a real image: 6x5 = 30 pixels
    with pytest.raises(DataError, match=r"a\.png is 6x5 = 30 pixels .*over the limit of 29 pixels"):
        ImageFolder(src, max_pixels=29).load(0)
    x, _ = load_folder_to_tensor(src, 4, skip_corrupt=True, max_pixels=59_999)  # the bomb left out
    assert x.shape == (1, 3, 4, 4) and int(x[0, 0, 0, 0]) == 1


def test_the_limit_is_raised_past_pil_own_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raising mimkit's limit is not undone by PIL's own bomb check (its error at 2x its limit)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # PIL alone would refuse a 6x5 image (30 > 2 * 10)
    src = tmp_path / "src"
    _png(src / "a.png", 7)
    image, _ = ImageFolder(src, max_pixels=100).load(0)
    assert image.size == (6, 5) and Image.MAX_IMAGE_PIXELS == 10  # restored


def _prepared(tmp_path: Path, n: int = 6, **kw) -> Path:
    src = tmp_path / "src"
    for i in range(n):
        _png(src / f"{i:02d}.png", i)
    out = tmp_path / "shards"
    prepare_shards(src, out, shard_size=3, progress=False, **kw)
    return out


def _write_shard_dir(out: Path, payloads: list[bytes], ext: str = "png", **meta) -> Path:
    """A hand-written shard directory (one tar) holding ``payloads`` as ``<key>.<ext>``."""
    out.mkdir(parents=True)
    tar_path = out / "shard-000000.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for k, data in enumerate(payloads):
            info = tarfile.TarInfo(f"{k:09d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tar_path) as tar:
        table = np.array([(m.offset_data, m.size, -1) for m in tar.getmembers()], np.int64).reshape(-1, 3)
    np.save(out / "shard-000000.idx.npy", table)
    index = {"format": "mimkit-shards-v1", "num_samples": len(payloads), "resize": None, "mode": "RGB",
             "in_chans": 3, "classes": [], "shards": [{"name": tar_path.name, "bytes": tar_path.stat().st_size,
                                                       "samples": len(payloads)}]}
    index.update(meta)
    (out / "index.json").write_text(json.dumps(index))
    return out


def test_shard_reader_refuses_a_header_bomb(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 6, 3), 9, np.uint8)).save(buf, format="PNG")
    good = buf.getvalue()
    out = _write_shard_dir(tmp_path / "s", [good, _bomb_png(13000, 13000), good, good])
    kw = dict(out_size=4, mean=(0.0,) * 3, std=(1.0,) * 3, augment="none", num_workers=0, shuffle=False)
    with pytest.raises(DataError) as e:
        list(ShardLoader(out, 2, **kw))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("image too large: ")
    assert f"{out / 'shard-000000.tar'} sample 1 is 13000x13000 = 169000000 pixels" in msg
    assert f"over the limit of {MAX_PIXELS} pixels" in msg and "MIMKIT_MAX_PIXELS=169000000" in msg
    ld = ShardLoader(out, 2, skip_corrupt=True, **kw)
    assert sum(len(y) for _, y in ld) == 4 and list(ld.skipped) == [f"{out / 'shard-000000.tar'}#1"]
    # the limit is the folder reader's: lowered, a real 6x5 image is refused from its header too
    with pytest.raises(DataError, match=r"sample 0 is 6x5 = 30 pixels .*over the limit of 29 pixels"):
        list(ShardLoader(out, 2, max_pixels=29, **kw))


def test_shard_reader_follows_the_environment_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _prepared(tmp_path)
    kw = dict(out_size=4, mean=(0.0,) * 3, std=(1.0,) * 3, augment="none", num_workers=0)
    assert sum(len(y) for _, y in ShardLoader(out, 2, **kw)) == 6
    monkeypatch.setenv("MIMKIT_MAX_PIXELS", "29")
    with pytest.raises(DataError, match=r"is 6x5 = 30 pixels .*over the limit of 29 pixels"):
        list(ShardLoader(out, 2, **kw))
    monkeypatch.setattr(folder_mod, "MAX_PIXELS", 29)  # the one place the default lives
    monkeypatch.delenv("MIMKIT_MAX_PIXELS")
    with pytest.raises(DataError, match=r"over the limit of 29 pixels"):
        list(ShardLoader(out, 2, **kw))
    with pytest.raises(DataError, match=r"over the limit of 29 pixels"):
        ImageFolder(tmp_path / "src").load(0)


def test_pre_resized_members_are_checked_from_their_header(tmp_path: Path) -> None:
    from mimkit.data.shards import _npy_uint8

    def npy(a: np.ndarray) -> bytes:
        b = io.BytesIO()
        np.save(b, a)
        return b.getvalue()

    a = np.arange(48, dtype=np.uint8).reshape(3, 4, 4)
    assert np.array_equal(_npy_uint8(npy(a), (3, 4, 4)), a)
    header = io.BytesIO()  # a header claiming 30 GB, followed by 48 bytes of data
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (3, 100000, 100000)})
    with pytest.raises(ValueError, match=r"\(3, 100000, 100000\) \(48 data bytes\), expected uint8 \(3, 4, 4\)"):
        _npy_uint8(header.getvalue() + a.tobytes(), (3, 4, 4))
    with pytest.raises(ValueError, match="float32"):
        _npy_uint8(npy(a.astype(np.float32)), (3, 4, 4))
    with pytest.raises(DataError, match=r"--resize 20 makes 400 pixels per image, over the pixel limit 100"):
        prepare_shards(tmp_path, tmp_path / "o", resize=20, max_pixels=100, progress=False)


# -- shard indices: names and tables ------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "sub/shard-000000.tar", "..", "shard-000000.tar/..",
                                  "shard-1.tar", "index.json", "", None, 7])
def test_shard_names_must_be_plain_shard_file_names(tmp_path: Path, name) -> None:
    out = _prepared(tmp_path)
    (tmp_path / "x.tar").write_bytes((out / "shard-000000.tar").read_bytes())  # a real tar one level up
    meta = json.loads((out / "index.json").read_text())
    meta["shards"][1]["name"] = name
    (out / "index.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as e:
        ShardIndex(out)
    msg = str(e.value)
    assert "\n" not in msg and f"shard entry 1 names {name!r}, not a plain shard file name" in msg
    assert "mimkit data prepare" in msg


def test_a_shard_listed_twice_is_refused(tmp_path: Path) -> None:
    out = _prepared(tmp_path)
    meta = json.loads((out / "index.json").read_text())
    meta["shards"].append(dict(meta["shards"][0]))
    (out / "index.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"shard 'shard-000000.tar' is listed twice"):
        ShardIndex(out)


@pytest.mark.parametrize("meta", [[1, 2], {"format": "mimkit-shards-v1"}, {"format": "mimkit-shards-v1", "shards": [
    {"name": "shard-000000.tar", "bytes": -1, "samples": 3}]}, {"format": "mimkit-shards-v1", "resize": "big",
                                                                 "shards": []},
    {"format": "mimkit-shards-v1", "mode": "L", "in_chans": 3, "shards": []}])
def test_malformed_indices_are_a_data_error(tmp_path: Path, meta) -> None:
    out = tmp_path / "s"
    out.mkdir()
    (out / "index.json").write_text(json.dumps(meta))
    with pytest.raises(DataError):
        ShardIndex(out)


@pytest.mark.parametrize("row", [(0, 10, -1), (-512, 10, -1), (513, 10, -1), (512, 10**9, -1), (512, -1, -1),
                                 (512, 10, 5), (512, 10, -2)])
def test_offset_tables_must_point_inside_their_tar(tmp_path: Path, row) -> None:
    out = _prepared(tmp_path)
    idx = out / "shard-000001.idx.npy"
    table = np.load(idx)
    table[2] = row
    np.save(idx, table)
    with pytest.raises(DataError, match=rf"shard table .*shard-000001.idx.npy row 2 \(offset {row[0]}, size "
                                        rf"{row[1]}, label {row[2]}\) does not point at a member inside"):
        ShardIndex(out)
    table = np.load(idx).astype(np.float64)
    np.save(idx, table)
    with pytest.raises(DataError, match="holds float64, not integer offsets"):
        ShardIndex(out)


def test_a_prepared_directory_still_reads(tmp_path: Path) -> None:
    """The checks accept what `data prepare` writes (labeled, pre-resized, several shards)."""
    src = tmp_path / "src"
    for i in range(8):
        _png(src / f"c{i % 2}" / f"{i}.png", i)
    out = tmp_path / "s"
    prepare_shards(src, out, shard_size=3, resize=4, progress=False)
    ix = ShardIndex(out)
    assert len(ix) == 8 and ix.classes == ["c0", "c1"] and ix.names == [f"shard-00000{j}.tar" for j in range(3)]
    ld = ShardLoader(out, 2, out_size=4, mean=(0.0,) * 3, std=(1.0,) * 3, augment="none", num_workers=0,
                     shuffle=False)
    got = [(int(round(float(x[0, 0, 0]) * 255)), int(y)) for xb, yb in ld for x, y in zip(xb, yb)]
    assert got == [(0, 0), (2, 0), (4, 0), (6, 0), (1, 1), (3, 1), (5, 1), (7, 1)]
    assert torch.is_tensor(next(iter(ld))[0])


def _grey_png(path: Path, value: int, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8), mode="L").save(path)
    return path


@pytest.mark.parametrize("colour_file", [False, True], ids=["all-grey", "one-colour-file"])
def test_prepare_keeps_a_grey_folder_grey(tmp_path: Path, colour_file: bool, capsys) -> None:
    """`mimkit data prepare` without --mode stores a folder of grey-scale files as L (one channel), and a
    folder with a colour file among them as RGB; the index says which, and the message too."""
    import json

    from mimkit.cli import main

    src = tmp_path / "src"
    for k in range(5):
        _grey_png(src / "a" / f"{k}.png", 10 * k)
    if colour_file:
        _png(src / "b" / "c.png", 40)
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(src), str(out), "--resize", "8", "--quiet"]) == 0
    index = json.loads((out / "index.json").read_text())
    want = "RGB" if colour_file else "L"
    assert index["mode"] == want and f" {want} images" in capsys.readouterr().out
    from mimkit.data import ShardLoader

    loader = ShardLoader(out, 2, mean=(0.5,) * (3 if colour_file else 1), std=(0.5,) * (3 if colour_file else 1),
                         out_size=8, augment="none", shuffle=False)
    images, _ = next(iter(loader))
    assert images.shape[1] == (3 if colour_file else 1)
    loader.close()


def test_visualize_and_prepare_help_show_defaults(capsys) -> None:
    from mimkit.cli import build_parser

    for argv in (["visualize", "--help"], ["data", "prepare", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        text = capsys.readouterr().out
        assert "(default: " in text, argv
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "prepare", "--help"])
    assert "(default: auto)" in capsys.readouterr().out
