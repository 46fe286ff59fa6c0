"""Image decoding and the folder / WebDataset sources, on fixtures built here with Pillow.

Every fixture folder mixes good images in every awkward mode with each kind of bad file, so each layout is
checked for exact skip counts, exactly-once delivery with the right caption, and the pixel conversions
(transparency on white, 16-bit scaling, centre crop).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from diffusion.data import images, sources
from diffusion.data.records import SKIP_REASONS, Sample, Skipped
from diffusion.data.sources import SourceError, iter_folder, iter_webdataset, summarise

RES = 16
TEMPLATE = "a photo of a {label}"
RED, YELLOW, BLUE = (255, 0, 0), (255, 255, 0), (0, 0, 255)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels: they compress badly, so a cut file is cut inside the image data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def half_transparent(mode: str, opaque) -> Image.Image:
    """Left half fully transparent (black underneath), right half ``opaque``."""
    img = Image.new(mode, (20, 20), 0)
    img.paste(opaque, (10, 0, 20, 20))
    return img


def palette_with_transparency() -> Image.Image:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 0 black (transparent), 1 green
    img.paste(1, (10, 0, 20, 20))
    img.info["transparency"] = 0
    return img


def wide_with_marked_centre() -> Image.Image:
    """48x16: black | yellow | white thirds, a red mark in the middle; the crop must keep yellow and red."""
    img = Image.new("RGB", (48, 16), (0, 0, 0))
    img.paste(YELLOW, (16, 0, 32, 16))
    img.paste((255, 255, 255), (32, 0, 48, 16))
    img.paste(RED, (22, 5, 26, 11))
    return img


def good_images() -> dict[str, bytes]:
    """Stem -> file; every one distinct after conversion, so none is a duplicate of another."""
    gradient = Image.fromarray(np.tile(np.arange(0, 200, 10, dtype=np.uint8), (20, 1)))
    one_bit = Image.new("1", (20, 20), 0)
    one_bit.paste(1, (0, 0, 20, 10))
    palette = Image.new("P", (20, 20), 5)
    palette.putpalette([i % 256 for i in range(768)])
    return {
        "grey.png": encode(gradient, "PNG"),
        "onebit.png": encode(one_bit, "PNG"),
        "palette.gif": encode(palette, "GIF"),
        "palette_alpha.png": encode(palette_with_transparency(), "PNG"),
        "rgba.png": encode(half_transparent("RGBA", BLUE + (255,)), "PNG"),
        "grey_alpha.png": encode(half_transparent("LA", (100, 255)), "PNG"),
        "cmyk.JPG": encode(Image.new("CMYK", (20, 20), (255, 0, 0, 0)), "JPEG", quality=95),
        "grey16.png": encode(Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)), "PNG"),
        "wide.png": encode(wide_with_marked_centre(), "PNG"),
        "tall.jpg": encode(noise((16, 40), seed=1), "JPEG", quality=90),
        "photo.webp": encode(noise((24, 24), seed=2), "WEBP", lossless=True),
    }


def bad_images() -> dict[str, bytes]:
    """Name -> file; the expected reason is in ``BAD_REASONS``."""
    png, jpg = encode(noise((64, 64), 3), "PNG"), encode(noise((64, 64), 4), "JPEG", quality=95)
    broken = bytearray(png)
    broken[200:400] = bytes(b ^ 0xFF for b in broken[200:400])  # inside the compressed pixel data
    return {
        "empty.jpg": b"",
        "notes.png": b"this is a text file with an image extension\n",
        "cut.png": png[: len(png) // 2],
        "cut.jpg": jpg[: len(jpg) // 2],
        "broken.png": bytes(broken),
    }


BAD_REASONS = {"empty_file": 1, "not_an_image": 1, "truncated": 2, "corrupt": 1}
EXTRA = {  # valid images that are skipped for their caption, and a copy of grey.png
    "uncaptioned.png": encode(noise((20, 20), 5), "PNG"),
    "blank_caption.png": encode(noise((20, 20), 6), "PNG"),
    "z_copy.png": good_images()["grey.png"],
}
SUBFOLDER = {"tall.jpg", "photo.webp", "cut.jpg"}  # these live in more/ (recursion)


def caption_of(name: str) -> str:
    return f"a picture of {Path(name).stem}"


def write(root: Path, files: dict[str, bytes | str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def flat_tree() -> dict[str, bytes]:
    """Relative path -> bytes for the captions and metadata layouts, plus files that must be ignored."""
    files = {**good_images(), **bad_images(), **EXTRA}
    tree = {(f"more/{name}" if name in SUBFOLDER else name): data for name, data in files.items()}
    tree.update({"README.md": b"# my images\n", ".DS_Store": b"\0\1", "._grey.png": b"AppleDouble"})
    return tree


def expected(good: dict[str, str], **reasons: int) -> tuple[dict[str, str], dict[str, int]]:
    counts = {reason: 0 for reason in SKIP_REASONS}
    counts.update(BAD_REASONS, duplicate=1, **reasons)
    return good, counts


def collect(items) -> tuple[dict[str, Sample], list[Skipped]]:
    samples: dict[str, Sample] = {}
    skipped = []
    for item in items:
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        assert item.meta["source"] not in samples, f"{item.meta['source']} yielded twice"
        samples[item.meta["source"]] = item
    return samples, skipped


def check(items, good_captions: dict[str, str], counts: dict[str, int]) -> dict[str, Sample]:
    """Exact skip counts; every good image once, with its caption, RGB at RES; the pixel conversions."""
    samples, skipped = collect(items)
    assert summarise(skipped) == counts, [(s.source, s.reason, s.detail) for s in skipped]
    assert {source: s.caption for source, s in samples.items()} == good_captions
    keys = [s.key for s in samples.values()]
    assert len(set(keys)) == len(keys) and all(re.fullmatch(r"[A-Za-z0-9_\-/]+", k) for k in keys), keys
    for sample in samples.values():
        assert sample.image.mode == "RGB" and sample.image.size == (RES, RES)
    by_stem = {Path(source).stem: np.asarray(s.image).astype(int) for source, s in samples.items()}
    for transparent in ("rgba", "palette_alpha", "grey_alpha"):
        assert (by_stem[transparent][RES // 2, 0] >= 250).all(), f"{transparent}: transparency not white"
    assert by_stem["rgba"][RES // 2, -1].tolist() == list(BLUE)
    assert abs(by_stem["grey16"][0, 0] - 128).max() <= 1  # 32768 / 257, not clipped to 255
    assert abs(by_stem["wide"][RES // 2, RES // 2] - RED).max() <= 40  # the centre survives the crop
    assert abs(by_stem["wide"][0, 0] - YELLOW).max() <= 40  # and the black/white sides are cut away
    assert abs(by_stem["cmyk"][0, 0] - (0, 255, 255)).max() <= 10
    wide = next(s for source, s in samples.items() if Path(source).stem == "wide")
    assert (wide.meta["original_width"], wide.meta["original_height"]) == (48, 16)
    return samples


def good_paths(tree: dict[str, bytes]) -> list[str]:
    names = set(good_images())
    return [path for path in tree if Path(path).name in names]


def test_captions_layout(tmp_path):
    tree = flat_tree()
    write(tmp_path, tree)
    for path in tree:
        if Path(path).suffix.lower() in {".png", ".jpg", ".webp", ".gif"} and Path(path).name != "uncaptioned.png":
            write(tmp_path, {str(Path(path).with_suffix(".txt")): caption_of(path) + "\n"})
    write(tmp_path, {"blank_caption.txt": "  \n"})
    good = {path: caption_of(path) for path in good_paths(tree)}
    for layout in ("captions", "auto"):  # README.md is counted, the .txt captions are not
        counts = expected(good, missing_caption=1, empty_caption=1, unsupported_format=1)
        check(iter_folder(tmp_path, layout, TEMPLATE, RES), *counts)


def test_captions_with_upper_case_suffixes(tmp_path):
    """IMG_0.JPG beside IMG_0.TXT, as cameras and Windows tools name them, and the usual lower case beside it."""
    write(tmp_path, {"IMG_0.JPG": encode(noise((20, 20), 0), "JPEG"), "IMG_0.TXT": "a red circle",
                     "IMG_1.png": encode(noise((20, 20), 1), "PNG"), "IMG_1.txt": "a blue square"})
    for layout in ("captions", "auto"):
        found, skipped = collect(iter_folder(tmp_path, layout, TEMPLATE, RES))
        assert {s.caption for s in found.values()} == {"a red circle", "a blue square"} and not skipped, skipped


def metadata_rows(tree: dict[str, bytes]) -> list[dict]:
    rows = [
        {"file_name": path, "text": caption_of(path)}
        for path in sorted(tree, reverse=True)  # any order in the file; the output is sorted anyway
        if Path(path).suffix not in {".md", ""} and not Path(path).name.startswith(".")
        and Path(path).name != "uncaptioned.png"
    ]
    for row in rows:
        if row["file_name"] == "blank_caption.png":
            row["text"] = "  "
        if row["file_name"] == "rgba.png":
            row["attributes"] = {"style": "flat", "count": 2}
    return rows + [{"file_name": "gone.png", "text": "listed but never saved"}]


def test_metadata_layout(tmp_path):
    tree = flat_tree()
    write(tmp_path, tree)
    lines = [json.dumps(row) for row in metadata_rows(tree)]
    write(tmp_path, {"metadata.jsonl": "\n".join(lines) + "\n"})
    good = {path: caption_of(path) for path in good_paths(tree)}
    for layout in ("metadata", "auto"):
        counts = expected(good, missing_caption=1, empty_caption=1, missing_file=1, unsupported_format=1)
        samples = check(iter_folder(tmp_path, layout, TEMPLATE, RES), *counts)
        assert samples["rgba.png"].meta["attributes"] == {"style": "flat", "count": "2"}
        assert samples["more/tall.jpg"].key == "more/tall"


def test_malformed_metadata_names_the_line(tmp_path):
    write(tmp_path, good_images())
    good_line = json.dumps({"file_name": "grey.png", "text": "grey"})
    write(tmp_path, {"metadata.jsonl": f"{good_line}\n\n{{'file_name': broken\n"})
    with pytest.raises(SourceError, match=r"metadata\.jsonl, line 3"):
        list(iter_folder(tmp_path, "auto", TEMPLATE, RES))
    write(tmp_path, {"metadata.jsonl": json.dumps({"file_name": "../outside.png", "text": "x"})})
    with pytest.raises(SourceError, match="line 1.*relative"):
        list(iter_folder(tmp_path, "metadata", TEMPLATE, RES))


def test_classes_layout(tmp_path):
    files = {**good_images(), **bad_images(), "z_copy.png": EXTRA["z_copy.png"]}
    in_dogs = SUBFOLDER | {"z_copy.png"}  # the copy sorts after big_cats/grey.png, so grey.png wins
    tree = {(f"dogs-small/{n}" if n in in_dogs else f"big_cats/{n}"): d for n, d in files.items()}
    tree["uncaptioned.png"] = EXTRA["uncaptioned.png"]  # in the root: no class
    tree["big_cats/about.txt"] = b"not an image, not counted"
    write(tmp_path, tree)
    label = {"big_cats": "big cats", "dogs-small": "dogs small"}
    good = {path: TEMPLATE.format(label=label[path.split("/")[0]]) for path in good_paths(tree)}
    for layout in ("classes", "auto"):
        samples = check(iter_folder(tmp_path, layout, TEMPLATE, RES), *expected(good, missing_caption=1))
        assert samples["dogs-small/tall.jpg"].meta["attributes"] == {"class": "dogs small"}


def test_folder_order_is_deterministic_and_errors_name_the_problem(tmp_path):
    write(tmp_path, {f"cats/{name}": data for name, data in {**good_images(), **bad_images()}.items()})

    def run():
        return [
            (item.key, item.image.tobytes()) if isinstance(item, Sample) else (item.source, item.reason)
            for item in iter_folder(tmp_path, "auto", TEMPLATE, RES)
        ]

    assert run() == run()
    with pytest.raises(SourceError, match="no such folder"):
        iter_folder(tmp_path / "nope", "auto", TEMPLATE, RES)  # at the call, before any work
    flat = tmp_path / "flat"
    write(flat, {"a.png": good_images()["grey.png"]})
    with pytest.raises(SourceError, match="metadata.*captions.*classes"):
        list(iter_folder(flat, "auto", TEMPLATE, RES))


def test_symlinked_folders_are_followed_once_and_unreadable_captions_skipped(tmp_path, monkeypatch):
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "data"
    write(elsewhere, {"dogs/a.png": encode(noise((24, 24), 1), "PNG")})
    write(root, {"cats/b.png": encode(noise((24, 24), 2), "PNG")})
    (root / "dogs").symlink_to(elsewhere / "dogs", target_is_directory=True)
    (root / "cats" / "loop").symlink_to(root, target_is_directory=True)  # a link to an ancestor: listed once
    items = list(iter_folder(root, "classes", TEMPLATE, RES))
    assert [item.key for item in items if isinstance(item, Sample)] == ["cats/b", "dogs/a"]
    assert [(i.source, i.reason) for i in items if isinstance(i, Skipped)] == [("cats/loop/", "duplicate")]

    write(root / "captioned", {"c.png": encode(noise((24, 24), 3), "PNG"), "c.txt": b"three",
                               "d.png": encode(noise((24, 24), 4), "PNG"), "d.txt": b"four"})
    read = sources.folder._read_caption

    def refuse_d(path):
        if path.name == "d.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return read(path)

    monkeypatch.setattr(sources.folder, "_read_caption", refuse_d)
    items = list(iter_folder(root / "captioned", "captions", TEMPLATE, RES))
    assert [i.caption for i in items if isinstance(i, Sample)] == ["three"]
    assert [(i.source, i.reason) for i in items if isinstance(i, Skipped)] == [("d.png", "missing_file")]


# --------------------------------------------------------------------------------------------- images


def test_exif_orientation_makes_phone_photos_upright():
    stored = Image.new("RGB", (30, 20), BLUE)
    stored.paste(RED, (0, 0, 15, 20))  # left half red as stored; orientation 6 shows it on top
    exif = Image.Exif()
    exif[0x0112] = 6
    prepared = images.prepare(encode(stored, "JPEG", quality=95, exif=exif), "phone.jpg", RES)
    assert prepared.original_size == (20, 30)
    pixels = np.asarray(prepared.image).astype(int)
    assert abs(pixels[0, RES // 2] - RED).max() <= 40 and abs(pixels[-1, RES // 2] - BLUE).max() <= 40


@pytest.mark.parametrize(
    ("img", "grey"),
    [
        (Image.frombytes("I;16B", (4, 4), (65535).to_bytes(2, "big") * 16), 255),
        (Image.fromarray(np.full((4, 4), 32768, dtype=np.int32)), 128),  # mode I
        (Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), 128),  # mode F in [0, 1]
    ],
)
def test_wide_modes_scale_to_8_bit(img, grey):
    assert np.asarray(images.to_rgb(img)).tolist() == np.full((4, 4, 3), grey).tolist()


def test_decompression_bomb_and_global_truncation_flag(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 20x20 = 400 > 2 * 50: Pillow refuses it
    bomb = images.decode(good_images()["grey.png"], "bomb.png")
    assert isinstance(bomb, Skipped) and bomb.reason == "too_large" and bomb.detail.startswith("400 pixels, over")
    monkeypatch.undo()
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as another library might set it
    assert images.decode(bad_images()["cut.png"], "cut.png").reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_overlapping_strict_decodings_restore_the_flag_only_when_the_last_ends(monkeypatch):
    """Two streams read side by side (each inside its own strict_decoding), with another library's True: the first
    to end must not turn truncated decoding back on under the other's threads (3 of 300 truncated JPEGs then got
    through as images on 4 threads)."""
    from contextlib import ExitStack

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    first, second = ExitStack(), ExitStack()
    first.enter_context(images.strict_decoding())
    second.enter_context(images.strict_decoding())
    first.close()  # the shorter stream ends
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert images.decode(bad_images()["cut.png"], "cut.png").reason == "truncated"
    second.close()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


# ----------------------------------------------------------------------------------------- webdataset


def write_tar(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(data[:cut] if cut else data)


def img2dataset_sample(key: str, image: tuple[str, bytes], txt: str | None, **json_fields) -> list:
    """The three files img2dataset writes per sample; json carries url, caption, sizes (+ ours)."""
    meta = {"url": f"https://example.com/{key}", "key": key, "status": "success", "width": 20, **json_fields}
    members = [(f"{key}.{image[0]}", image[1]), (f"{key}.json", json.dumps(meta).encode())]
    return members + ([(f"{key}.txt", txt.encode())] if txt is not None else [])


def make_shards(root: Path) -> None:
    good, bad = good_images(), bad_images()
    write_tar(root / "shards-000.tar", [
        *img2dataset_sample("000000000", ("jpg", good["tall.jpg"]), "tall", attributes={"kind": "noise"}),
        *img2dataset_sample("000000001", ("png", bad["broken.png"]), "broken"),
        *img2dataset_sample("000000002", ("png", good["rgba.png"]), None),  # no txt, no json caption
        *img2dataset_sample("000000003", ("webp", good["photo.webp"]), " "),
    ])
    write_tar(root / "shards-001.tar", [
        *img2dataset_sample("000000004", ("png", good["wide.png"]), None, caption="wide from json"),
        *img2dataset_sample("000000005", ("jpg", good["tall.jpg"]), "same pixels as 000000000"),
        ("000000006.txt", b"an image that never downloaded"),
    ])
    # A tar that breaks off inside its second sample's image: the first sample still counts.
    members = img2dataset_sample("000000007", ("png", good["grey.png"]), "grey")
    members += img2dataset_sample("000000008", ("png", encode(noise((64, 64), 7), "PNG")), "lost")
    write_tar(root / "shards-002.tar", members, cut=4096 + 512 * 3)


def test_webdataset_source(tmp_path):
    make_shards(tmp_path)
    patterns = [
        str(tmp_path / "shards-*.tar"),
        str(tmp_path / "shards-{000..002}.tar"),
        [str(tmp_path / f"shards-00{i}.tar") for i in (2, 0, 1)],  # a list, sorted by the source
    ]
    runs = [collect(iter_webdataset(pattern, RES)) for pattern in patterns]
    samples, skipped = runs[0]
    counts = {reason: 0 for reason in SKIP_REASONS}
    counts.update(corrupt=2, missing_caption=1, empty_caption=1, duplicate=1, missing_file=1)
    assert summarise(skipped) == counts, [(s.source, s.reason, s.detail) for s in skipped]
    assert [s.key for s in samples.values()] == ["000000000", "000000004", "000000007"]
    assert [s.caption for s in samples.values()] == ["tall", "wide from json", "grey"]
    first = next(iter(samples.values()))
    assert first.meta["url"] == "https://example.com/000000000" and first.meta["attributes"] == {"kind": "noise"}
    assert all(s.image.mode == "RGB" and s.image.size == (RES, RES) for s in samples.values())
    for other_samples, other_skipped in runs[1:]:  # same result, same order, whichever way it was named
        assert [(k, s.image.tobytes()) for k, s in other_samples.items()] == [
            (k, s.image.tobytes()) for k, s in samples.items()
        ]
        assert other_skipped == skipped


def test_tar_cut_on_a_header_boundary_is_counted_corrupt(tmp_path):
    """tarfile's stream mode ends silently where the file ends on a 512-byte header boundary; the source must
    still see the missing end-of-archive block and count the tar corrupt instead of losing its rest unseen."""
    members = []
    for i in range(3):
        members += img2dataset_sample(f"00000000{i}", ("png", encode(noise((24, 24), i), "PNG")), f"noise {i}")
    write_tar(tmp_path / "whole.tar", members)
    data = (tmp_path / "whole.tar").read_bytes()
    header = data.index(b"000000001.png")  # the second sample's first header: a block boundary
    assert header % 512 == 0
    (tmp_path / "cut.tar").write_bytes(data[:header])
    samples, skipped = collect(iter_webdataset(str(tmp_path / "cut.tar"), RES))
    assert [s.reason for s in skipped] == ["corrupt"] and "end-of-archive" in skipped[0].detail
    whole, none = collect(iter_webdataset(str(tmp_path / "whole.tar"), RES))
    assert len(whole) == 3 and none == []


def test_webdataset_source_errors(tmp_path):
    with pytest.raises(SourceError, match="no tar files matched"):
        iter_webdataset(str(tmp_path / "*.tar"), RES)  # at the call, before any work
    with pytest.raises(SourceError, match="no such tar file"):
        iter_webdataset(str(tmp_path / "shards-{000..001}.tar"), RES)
    # The shards' folder where a pattern is expected: the error gives the pattern that reads them.
    with pytest.raises(SourceError, match="a folder, not a tar file .*holds no .tar files.*shard.source=folder"):
        iter_webdataset(str(tmp_path), RES)
    write_tar(tmp_path / "a.tar", img2dataset_sample("000000000", ("png", encode(noise((24, 24), 0), "PNG")), "x"))
    pattern = re.escape(repr(str(tmp_path / "*.tar")))
    with pytest.raises(SourceError, match=r"a folder, not a tar file .*its 1 \.tar files.*" + pattern):
        iter_webdataset(str(tmp_path), RES)


def test_img2dataset_original_size_is_kept(tmp_path):
    """img2dataset records the size before its own resize in the json; that is the true original size and
    must not be replaced by the size of the (already resized) image in the tar."""
    write_tar(tmp_path / "s-000.tar", img2dataset_sample("000000000", ("png", encode(noise((40, 20), 0), "PNG")),
                                                        "a photo", original_width=4000, original_height=2000))
    (sample,) = list(iter_webdataset(str(tmp_path / "s-000.tar"), RES))
    assert (sample.meta["original_width"], sample.meta["original_height"]) == (4000, 2000)


# ----------------------------------------------------------------------------------------- threads


def _stream(items) -> list[tuple]:
    """Everything a source yields, in order, comparable: samples with their pixels, skips with their details."""
    return [(s.key, s.caption, s.meta, s.split_key, s.image.tobytes()) if isinstance(s, Sample) else s for s in items]


def test_threads_read_decode_and_leave_the_stream_as_one_thread_does(tmp_path, monkeypatch):
    """`workers` threads read, decode and resize; duplicates, keys and order are settled in the stream's order,
    so the result (every bad file, the duplicate kept or dropped, each key) is the same for any number of them.
    Run with another library's LOAD_TRUNCATED_IMAGES = True: the threads must still skip truncated files, and
    the flag must come back as it was (switching it per image from several threads would race)."""
    import threading

    import diffusion.data.ordered_pool as ordered_pool
    import diffusion.data.sources.common as common

    monkeypatch.setattr(ordered_pool, "MIN_SECONDS", 0.0)  # threads even for these small images
    monkeypatch.setattr(ordered_pool, "PROBE", 2)  # the folder holds few images
    monkeypatch.setattr(ordered_pool, "BATCH", 2)  # and so several tasks
    tree = flat_tree()
    write(tmp_path / "f", tree)
    write(tmp_path / "f", {str(Path(p).with_suffix(".txt")): caption_of(p) for p in tree if Path(p).suffix != ".md"})
    (tmp_path / "t").mkdir()
    make_shards(tmp_path / "t")
    threads: set[str] = set()
    real = common._prepare

    def prepare(candidate, resolution):
        threads.add(threading.current_thread().name)
        # Long enough that a task is still running when the next is submitted: an executor hands a task to an idle
        # thread before it starts another, and these tiny images alone decode faster than the stream is read.
        time.sleep(0.01)
        return real(candidate, resolution)

    monkeypatch.setattr(common, "_prepare", prepare)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as another library might set it

    one = _stream(iter_folder(tmp_path / "f", "captions", "", RES, workers=1))
    assert threads == {threading.current_thread().name}
    three = _stream(iter_folder(tmp_path / "f", "captions", "", RES, workers=3))
    assert len(threads - {threading.current_thread().name}) > 1 and all(
        t.startswith("shard-decode") for t in threads - {threading.current_thread().name})
    assert three == one
    skipped = [s for s in one if isinstance(s, Skipped)]
    assert summarise(skipped)["truncated"] == BAD_REASONS["truncated"] and summarise(skipped)["duplicate"] == 1
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    tars = str(tmp_path / "t" / "shards-*.tar")
    assert _stream(iter_webdataset(tars, RES, workers=4)) == _stream(iter_webdataset(tars, RES, workers=1))
