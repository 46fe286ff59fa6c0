"""The folder source's guarantees that the reviewer's folder broke: keys and splits that depend on each image
alone, a listing that does not depend on directory order, every file accounted for, captions decoded strictly,
and metadata.jsonl files checked before any work."""

from __future__ import annotations

import codecs
import re
import shutil
from pathlib import Path

import pytest
from test_sources import RES, TEMPLATE, collect, encode, noise, write

from diffusion.data.records import Sample, Skipped
from diffusion.data.sources import iter_folder, sanitise_key


def png(seed: int) -> bytes:
    return encode(noise((20, 20), seed), "PNG")


def captioned(names: list[str]) -> dict[str, bytes | str]:
    """Each image (distinct pixels) with a side-car caption naming it."""
    files: dict[str, bytes | str] = {}
    for seed, name in enumerate(names):
        files[name] = png(seed)
        files[str(Path(name).with_suffix(".txt"))] = f"picture {seed}"
    return files


def keys_by_source(root: Path, layout: str = "captions") -> dict[str, str]:
    samples, _ = collect(iter_folder(root, layout, TEMPLATE, RES))
    return {source: sample.key for source, sample in samples.items()}


# ------------------------------------------------------------------------------------------------- keys


def test_keys_are_webdataset_safe():
    assert re.fullmatch(r"my_photos/IMG_0001_final-[0-9a-f]{8}", sanitise_key("my photos/IMG 0001.final.JPG"))
    assert sanitise_key("my_photos/IMG_0001.JPG") == "my_photos/IMG_0001"  # safe names are their own key
    assert sanitise_key("café.png") != sanitise_key("cafè.png")
    assert sanitise_key("cafe\u0301.png") == sanitise_key("caf\u00e9.png")  # NFD (macOS) and NFC: one key


def test_keys_depend_only_on_each_images_own_name(tmp_path):
    """Adding or removing one image must not change another's key: the split hashes the key, so a changed key
    moves an image between train and val, and val images leak into a model trained on the earlier split."""
    names = ["猫.png", "狗.png", "a b.jpg", "a_b.png", "photo.v2.jpg", "plain.png"]
    write(tmp_path / "all", captioned(names))
    every = keys_by_source(tmp_path / "all")
    assert len(set(every.values())) == len(names)
    assert every["a_b.png"] == "a_b" and every["plain.png"] == "plain"  # safe names keep their keys
    for removed in names:
        folder = tmp_path / f"without-{names.index(removed)}"
        shutil.copytree(tmp_path / "all", folder)
        (folder / removed).unlink()
        assert keys_by_source(folder) == {n: k for n, k in every.items() if n != removed}, removed
    assert every["猫.png"] == sanitise_key("猫.png") and every["猫.png"].startswith("_-")


def test_twins_differing_in_extension_get_distinct_keys_and_one_split(tmp_path):
    """x.jpg and x.png both sanitise to x: the first in sorted order keeps it, the other gets a hash of its
    whole name (not a counter), and both share the split key, so neither moves when the other comes or goes."""
    write(tmp_path / "both", {"x.jpg": encode(noise((20, 20), 1), "JPEG"), "x.png": png(2), "x.txt": "an x"})
    samples, _ = collect(iter_folder(tmp_path / "both", "captions", TEMPLATE, RES))
    assert samples["x.jpg"].key == "x" and samples["x.png"].key.startswith("x-")
    assert {s.split_key for s in samples.values()} == {"x"}
    write(tmp_path / "png", {"x.png": png(2), "x.txt": "an x"})
    alone, _ = collect(iter_folder(tmp_path / "png", "captions", TEMPLATE, RES))
    assert alone["x.png"].key == "x" and alone["x.png"].split_key == "x"


# ---------------------------------------------------------------------------------------------- listing


@pytest.mark.parametrize("link_name", ["alink", "zlink"])
def test_a_folder_linked_twice_is_read_at_its_real_path_whatever_the_directory_order(tmp_path, link_name):
    """``zlink -> sub1``: the copy listed (the other is a pixel duplicate) depended on the order the file system
    returned entries in; the real folder must win, and the link be recorded, not silently dropped."""
    root = tmp_path / "data"
    write(root, captioned(["sub1/img.png", "sub2/other.png"]))
    (root / link_name).symlink_to(root / "sub1", target_is_directory=True)
    items = list(iter_folder(root, "captions", TEMPLATE, RES))
    assert sorted(i.meta["source"] for i in items if isinstance(i, Sample)) == ["sub1/img.png", "sub2/other.png"]
    skipped = [(i.source, i.reason, i.detail) for i in items if isinstance(i, Skipped)]
    assert skipped == [(f"{link_name}/", "duplicate", "the same folder as sub1/, listed there")]


def test_listing_does_not_depend_on_directory_order(tmp_path, monkeypatch):
    """Folders come from the file system in its own order; reversing that order must change nothing."""
    import os

    root = tmp_path / "data"
    write(root, captioned(["b/1.png", "a/2.png", "c/3.png"]))
    (root / "a_link").symlink_to(root / "c", target_is_directory=True)
    (root / "z_link").symlink_to(root / "a", target_is_directory=True)
    first = [(i.source, i.reason) if isinstance(i, Skipped) else i.key
             for i in iter_folder(root, "captions", TEMPLATE, RES)]
    real_scandir = os.scandir

    class ReversedScandir:
        """``os.scandir`` with the entries in the opposite order (as another file system might return them)."""

        def __init__(self, path):
            with real_scandir(path) as entries:
                self.entries = iter(list(entries)[::-1])

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

    monkeypatch.setattr(os, "scandir", ReversedScandir)  # os.walk lists folders with it too
    second = [(i.source, i.reason) if isinstance(i, Skipped) else i.key
              for i in iter_folder(root, "captions", TEMPLATE, RES)]
    assert first == second
    assert ("a_link/", "duplicate") in first and ("z_link/", "duplicate") in first


# ------------------------------------------------------------------------------------ extensions, counts


def test_every_accepted_extension_is_one_pillow_reads():
    from PIL import Image

    from diffusion.data.sources import IMAGE_EXTENSIONS

    registered = Image.registered_extensions()
    assert all(registered.get(ext) in Image.OPEN for ext in IMAGE_EXTENSIONS), IMAGE_EXTENSIONS


def test_avif_jfif_and_jpe_are_read_and_every_other_file_is_counted(tmp_path):
    """Pillow decodes .avif, .jfif and .jpe; they were dropped unseen. Files that are not read (HEIC, notes,
    spreadsheets) must each be counted, not vanish; captions and metadata.jsonl are not counted."""
    from PIL import features

    jpeg = encode(noise((20, 20), 1), "JPEG")
    files = {"old.jfif": jpeg, "older.JPE": encode(noise((20, 20), 2), "JPEG"), "phone.heic": b"ftypheic....",
             "notes.md": "# notes", "sizes.csv": "a,b", "README": "about", "orphan.txt": "no image"}
    if features.check("avif"):
        files["new.avif"] = encode(noise((20, 20), 3), "AVIF")
    for name in [n for n in files if n != "orphan.txt"]:
        files[str(Path(name).with_suffix(".txt"))] = f"caption of {name}"
    write(tmp_path, files)
    samples, skipped = collect(iter_folder(tmp_path, "captions", TEMPLATE, RES))
    assert sorted(samples) == sorted(n for n in ("new.avif", "old.jfif", "older.JPE") if n in files)
    assert sorted((s.source, s.reason) for s in skipped) == [
        ("README", "unsupported_format"), ("notes.md", "unsupported_format"),
        ("phone.heic", "unsupported_format"), ("sizes.csv", "unsupported_format")]
    assert "pillow-heif" in next(s.detail for s in skipped if s.source == "phone.heic")


def test_webdataset_samples_with_a_jfif_image_are_read(tmp_path):
    from test_sources import write_tar

    from diffusion.data.sources import iter_webdataset

    write_tar(tmp_path / "a.tar", [("000.jfif", encode(noise((20, 20), 1), "JPEG")), ("000.txt", b"a photo")])
    samples, skipped = collect(iter_webdataset(str(tmp_path / "a.tar"), RES))
    assert [s.caption for s in samples.values()] == ["a photo"] and not skipped


# ------------------------------------------------------------------------------------------- encodings


CAPTION = "un café crème ☕"


@pytest.mark.parametrize(("encoded", "good"), [
    (CAPTION.encode("utf-8"), True),
    (b"\xef\xbb\xbf" + CAPTION.encode("utf-8"), True),  # UTF-8 with the BOM Windows editors add
    (CAPTION.encode("utf-16"), True),  # Notepad's "Unicode": UTF-16 with its byte-order mark
    (codecs.BOM_UTF16_BE + CAPTION.encode("utf-16-be"), True),
    ("un café crème".encode("latin-1"), False),
    ("un café crème".encode("utf-16-le"), False),  # no byte-order mark: NULs between the letters
], ids=["utf-8", "utf-8-bom", "utf-16-bom", "utf-16-be-bom", "latin-1", "utf-16-no-bom"])
def test_captions_are_decoded_strictly_or_skipped_naming_the_file(tmp_path, encoded, good):
    write(tmp_path, {"cup.png": png(1), "cup.txt": encoded})
    samples, skipped = collect(iter_folder(tmp_path, "captions", TEMPLATE, RES))
    if good:
        assert [s.caption for s in samples.values()] == [CAPTION.strip()] and not skipped
    else:
        assert not samples and [(s.source, s.reason) for s in skipped] == [("cup.png", "bad_caption_encoding")]
        assert skipped[0].detail.startswith("cup.txt: ")


def test_webdataset_captions_are_decoded_strictly(tmp_path):
    from test_sources import write_tar

    from diffusion.data.sources import iter_webdataset

    write_tar(tmp_path / "a.tar", [("000.png", png(1)), ("000.txt", "café".encode("latin-1")),
                                   ("001.png", png(2)), ("001.txt", "thé".encode("utf-16"))])
    samples, skipped = collect(iter_webdataset(str(tmp_path / "a.tar"), RES))
    assert [s.caption for s in samples.values()] == ["thé"]
    assert [(s.source.rsplit("#")[-1], s.reason) for s in skipped] == [("000", "bad_caption_encoding")]


@pytest.mark.parametrize(("content", "line"), [
    ('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "caf\xe9"}\n'.encode("latin-1"), 2),
    ('{"file_name": "a.png", "text": "ok"}\n'.encode("utf-16-le"), 1),
], ids=["latin-1", "utf-16-no-bom"])
def test_a_metadata_file_in_another_encoding_is_a_source_error_naming_file_and_line(tmp_path, content, line):
    from diffusion.data.sources import SourceError

    write(tmp_path, {"a.png": png(1), "b.png": png(2), "metadata.jsonl": content})
    with pytest.raises(SourceError, match=rf"metadata\.jsonl, line {line}: "):
        list(iter_folder(tmp_path, "metadata", TEMPLATE, RES))


def test_a_utf16_metadata_file_with_its_byte_order_mark_is_read(tmp_path):
    write(tmp_path, {"a.png": png(1), "metadata.jsonl": '{"file_name": "a.png", "text": "thé"}\r\n'.encode("utf-16")})
    samples, skipped = collect(iter_folder(tmp_path, "metadata", TEMPLATE, RES))
    assert [s.caption for s in samples.values()] == ["thé"] and not skipped


# ------------------------------------------------------------------------------------ metadata.jsonl


def jsonl(*rows: dict) -> str:
    import json

    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def test_metadata_jsonl_files_in_subfolders_are_read_relative_to_their_folder(tmp_path):
    """Hugging Face's imagefolder splits put metadata.jsonl in train/ and test/; read from the root only, such a
    folder was taken for class folders and every caption became "a photo of a train"."""
    write(tmp_path, {
        "train/imgs/a.png": png(1), "train/imgs/b.png": png(2), "test/c.png": png(3), "loose/d.png": png(4),
        "train/metadata.jsonl": jsonl({"file_name": "imgs/a.png", "text": "an a"},
                                      {"file_name": "imgs\\b.png", "text": "a b", "rating": 3}),
        "test/metadata.jsonl": jsonl({"file_name": "c.png", "text": "a c"}, {"file_name": "gone.png", "text": "x"}),
    })
    # Read as ordinary folders: loose/d.png beside train/ and test/ stops a folder split (tested below).
    source = iter_folder(tmp_path, "auto", TEMPLATE, RES, folder_splits="ignore")
    samples, skipped = collect(source)
    assert {name: s.caption for name, s in samples.items()} == {
        "train/imgs/a.png": "an a", "train/imgs/b.png": "a b", "test/c.png": "a c"}
    assert samples["train/imgs/b.png"].meta["rating"] == 3
    assert sorted((s.source, s.reason, s.detail) for s in skipped) == [
        ("loose/d.png", "missing_caption", "no metadata.jsonl in its folder or above"),
        ("test/gone.png", "missing_file", "listed in test/metadata.jsonl, line 2, but not found")]
    assert source.layout == "metadata"


def test_a_malformed_metadata_file_stops_the_source_before_any_image_is_read(tmp_path):
    """iter_folder was a lazy generator: a bad line was found only once the stage had started."""
    from diffusion.data.sources import SourceError

    write(tmp_path, {
        "a.png": png(1), "sub/b.png": png(2), "metadata.jsonl": jsonl({"file_name": "a.png", "text": "a"}),
        "sub/metadata.jsonl": jsonl({"file_name": "b.png", "text": "b"}, {"file_name": "a.png", "text": 5})})
    with pytest.raises(SourceError, match=r"sub/metadata\.jsonl, line 2: 'text' must be a string, got 5"):
        iter_folder(tmp_path, "auto", TEMPLATE, RES)  # no iteration


# ------------------------------------------------------------------------------------- smaller problems


def test_a_name_decomposed_on_disk_matches_its_composed_spelling_in_metadata(tmp_path):
    """macOS writes café.png decomposed (NFD); metadata.jsonl holds what was typed (NFC). Unnormalised, the image
    was skipped twice: as missing_caption (on disk, unlisted) and missing_file (listed, not found)."""
    nfd, nfc = "imgs/cafe\u0301.png", "imgs/caf\u00e9.png"
    rows = jsonl({"file_name": nfc, "text": "a café"}, {"file_name": "imgs/b.png", "text": "b"})
    write(tmp_path, {nfd: png(1), "imgs/b.png": png(2), "metadata.jsonl": rows})
    samples, skipped = collect(iter_folder(tmp_path, "metadata", TEMPLATE, RES))
    assert not skipped, skipped
    assert samples[nfc].caption == "a café" and samples[nfc].key == sanitise_key(nfc)


def test_a_decompression_bomb_sized_image_is_too_large_not_corrupt(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 20x20 = 400 > 2 * 100, as 195 Mpx is over the default
    write(tmp_path, {"scan.png": png(1), "scan.txt": "a large scan"})
    _, skipped = collect(iter_folder(tmp_path, "captions", TEMPLATE, RES))
    assert [(s.reason, s.detail.split(",")[0]) for s in skipped] == [("too_large", "400 pixels")]


def test_an_empty_folder_or_a_file_is_named_for_what_it_is(tmp_path):
    from diffusion.data.sources import SourceError

    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found in .*empty: it is empty"):
        iter_folder(tmp_path / "empty", "auto", TEMPLATE, RES)
    write(tmp_path / "docs", {"a.md": "x", "b.csv": "y"})
    with pytest.raises(SourceError, match=r"no images found in .*docs: 2 files \(a\.md, b\.csv\), none with an"):
        iter_folder(tmp_path / "docs", "captions", TEMPLATE, RES)
    write(tmp_path, {"photo.png": png(1)})
    with pytest.raises(SourceError, match="photo.png is a file; expected the folder"):
        iter_folder(tmp_path / "photo.png", "auto", TEMPLATE, RES)


def test_metadata_rows_that_repeat_a_file_or_give_no_text_say_which_line(tmp_path):
    rows = jsonl({"file_name": "a.png", "text": "a"}, {"file_name": "b.png", "text": None},
                 {"file_name": "a.png", "text": "A"})
    write(tmp_path, {"a.png": png(1), "b.png": png(2), "metadata.jsonl": rows})
    samples, skipped = collect(iter_folder(tmp_path, "metadata", TEMPLATE, RES))
    assert [s.caption for s in samples.values()] == ["a"]
    assert [(s.source, s.reason, s.detail) for s in skipped] == [
        ("a.png", "duplicate", "listed again in metadata.jsonl, line 3 (first: metadata.jsonl, line 1)"),
        ("b.png", "missing_caption", "no 'text' in metadata.jsonl, line 2")]


def test_a_file_name_that_is_not_utf8_is_counted_not_a_crash(tmp_path):
    """Linux keeps such names as bytes (Python: lone surrogates), which no JSON or tar name can hold: writing
    the sample crashed the stage."""
    import os

    write(tmp_path, captioned(["ok.png"]))
    for folder in (b"", b"sub\xe9/"):
        os.makedirs(os.path.join(os.fsencode(tmp_path), folder), exist_ok=True)
        for suffix, data in ((b".png", png(9)), (b".txt", b"a caption")):
            with open(os.path.join(os.fsencode(tmp_path), folder + b"caf\xe9" + suffix), "wb") as f:
                f.write(data)
    samples, skipped = collect(iter_folder(tmp_path, "captions", TEMPLATE, RES))
    assert list(samples) == ["ok.png"]
    assert sorted((s.source, s.reason) for s in skipped) == [  # the images; their captions are not counted
        ("caf\ufffd.png", "unsupported_format"), ("sub\ufffd/caf\ufffd.png", "unsupported_format")]


def test_the_readme_lists_the_accepted_extensions():
    from conftest import ROOT

    from diffusion.data.sources import IMAGE_EXTENSIONS

    readme = " ".join((ROOT / "README.md").read_text().split())
    listed = readme.split("Image files are recognised by extension, in any case: `")[1].split("`")[0].split()
    assert sorted(listed) == sorted(IMAGE_EXTENSIONS)


def test_skip_details_say_what_is_missing_or_what_the_file_is(tmp_path):
    """skipped.jsonl lists every skip with its detail; an empty detail left the user guessing."""
    write(tmp_path, {"sub/nocap.png": png(1), "page.jpg": b"<!DOCTYPE html><html>404</html>", "page.txt": "a page"})
    _, skipped = collect(iter_folder(tmp_path, "captions", TEMPLATE, RES))
    assert sorted((s.source, s.reason, s.detail) for s in skipped) == [
        ("page.jpg", "not_an_image", "not an image format Pillow recognises; it starts b'<!DOCTYPE html><'"),
        ("sub/nocap.png", "missing_caption", "no nocap.txt beside it")]


def test_metadata_whose_rows_name_the_caption_otherwise_is_a_source_error(tmp_path):
    """'caption' instead of 'text' on every line skipped every image as missing_caption, then stopped with
    'no usable image' and advice about class folders."""
    from diffusion.data.sources import SourceError

    write(tmp_path, {"imgs/a.png": png(1), "metadata.jsonl": jsonl({"file_name": "imgs/a.png", "caption": "ok"})})
    with pytest.raises(SourceError, match=r"no line gives a 'text'.*line 1 has 'file_name', 'caption'"):
        iter_folder(tmp_path, "auto", TEMPLATE, RES)


def test_a_folder_whose_only_images_have_unreadable_names_says_so(tmp_path):
    import os

    from diffusion.data.sources import SourceError

    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"), "wb") as f:
        f.write(png(1))
    with pytest.raises(SourceError, match="no images found in .*: no file could be listed; not read: caf\ufffd.png \\(its name"):
        iter_folder(tmp_path, "auto", TEMPLATE, RES)


# ------------------------------------------------------------------------------------------ split folders


def splits_of(root: Path, layout: str = "auto", folder_splits: str = "auto") -> dict[str, str]:
    samples, _ = collect(iter_folder(root, layout, TEMPLATE, RES, folder_splits=folder_splits))
    return {source: sample.split for source, sample in samples.items()}


def test_caption_files_in_train_and_val_folders_give_each_sample_its_split(tmp_path):
    """Hugging Face's split folders: every image of train/ is train and every image of val/ is val, whatever
    its name hashes to (the stage's hash split let test images train)."""
    write(tmp_path, captioned(["train/a.png", "train/sub/b.png", "val/c.png", "val/d.png"]))
    assert splits_of(tmp_path) == {"train/a.png": "train", "train/sub/b.png": "train", "val/c.png": "val",
                                   "val/d.png": "val"}
    assert iter_folder(tmp_path, "auto", TEMPLATE, RES).splits.to_manifest() == {
        "train": ["train"], "val": ["val"], "not_read": []}
    # ignore: the folders are ordinary folders again, for the stage to hash
    assert set(splits_of(tmp_path, folder_splits="ignore").values()) == {""}


def test_class_folders_inside_train_and_test_are_the_classes(tmp_path):
    """train/cats/1.png is a cat in the train split, not a "train" (the top folder was the class)."""
    write(tmp_path, {"train/cats/1.png": png(1), "train/dogs/2.png": png(2), "test/cats/3.png": png(3),
                     "train/loose.png": png(4)})
    source = iter_folder(tmp_path, "auto", TEMPLATE, RES)
    assert source.layout == "classes" and source.reason == "images are in subfolders, e.g. test/cats/3.png"
    samples, skipped = collect(source)
    assert {name: (s.caption, s.meta["attributes"]["class"], s.split) for name, s in samples.items()} == {
        "train/cats/1.png": ("a photo of a cats", "cats", "train"),
        "train/dogs/2.png": ("a photo of a dogs", "dogs", "train"),
        "test/cats/3.png": ("a photo of a cats", "cats", "val")}
    assert [(s.source, s.reason, s.detail) for s in skipped] == [
        ("train/loose.png", "missing_caption", "not inside a class folder")]


def test_split_folders_without_class_folders_inside_are_not_classes(tmp_path):
    """Images directly in train/ and test/, no caption: not taken for two classes named train and test."""
    from diffusion.data.sources import SourceError

    write(tmp_path, {"train/1.png": png(1), "test/2.png": png(2)})
    with pytest.raises(SourceError, match="cannot tell how captions are given"):
        iter_folder(tmp_path, "auto", TEMPLATE, RES)


def test_a_test_folder_beside_a_validation_folder_is_not_read(tmp_path):
    """validation/ is the val split; test/ (HF's third split) is neither trained on nor evaluated, not even
    through a metadata.jsonl in the root that lists its images, and its broken files are not counted."""
    write(tmp_path, {
        "train/a.png": png(1), "validation/b.png": png(2), "test/c.png": png(3), "test/broken.png": b"",
        "train/metadata.jsonl": jsonl({"file_name": "a.png", "text": "an a"}),
        "validation/metadata.jsonl": jsonl({"file_name": "b.png", "text": "a b"}),
        "test/metadata.jsonl": jsonl({"file_name": "c.png", "text": "a c"}),
        "metadata.jsonl": jsonl({"file_name": "test/broken.png", "text": "broken"}),
    })
    source = iter_folder(tmp_path, "auto", TEMPLATE, RES)
    samples, skipped = collect(source)
    assert {name: s.split for name, s in samples.items()} == {"train/a.png": "train", "validation/b.png": "val"}
    assert skipped == []
    assert source.splits.to_manifest() == {"train": ["train"], "val": ["validation"], "not_read": ["test"]}
    assert "test/ not read" in source.splits.describe()


def test_two_validation_folders_are_one_val_split(tmp_path):
    """val/ and validation/ both match datasets' validation keywords: it merges them, and so do we."""
    write(tmp_path, captioned(["train/a.png", "val/b.png", "validation/c.png", "dev/d.png"]))
    assert splits_of(tmp_path) == {"train/a.png": "train", "val/b.png": "val", "validation/c.png": "val",
                                   "dev/d.png": "val"}


def test_images_outside_the_split_folders_stop_the_source_naming_them(tmp_path):
    """An image in the root (or another folder) beside train/ and test/: train or held out cannot be told."""
    from diffusion.data.sources import SourceError

    write(tmp_path, captioned(["train/a.png", "test/b.png", "c.png", "extra/d.png"]))
    with pytest.raises(SourceError, match=r"2 images are outside them: c.png, extra/d.png.*folder_splits=ignore") \
            as error:
        iter_folder(tmp_path, "auto", TEMPLATE, RES)
    assert error.value.key == "folder_splits"
    assert set(splits_of(tmp_path, folder_splits="ignore")) == {"train/a.png", "test/b.png", "c.png", "extra/d.png"}
    (tmp_path / "extra/d.png").unlink()
    with pytest.raises(SourceError, match=r"but 1 image is outside them: c.png\. Move"):
        iter_folder(tmp_path, "auto", TEMPLATE, RES)


@pytest.mark.parametrize("layout", ["metadata", "captions", "classes"])
def test_images_outside_the_split_folders_without_a_caption_are_skipped_not_refused(tmp_path, layout):
    """A cover picture beside train/ and test/ that the layout gives no caption (no metadata.jsonl lists it, no
    .txt beside it, no class folder) would never be read: it is skipped and counted, as in any folder."""
    from diffusion.data.sources import SourceError

    if layout == "classes":
        write(tmp_path, {"train/cats/a.png": png(1), "test/dogs/b.png": png(2)})
    else:
        write(tmp_path, captioned(["train/a.png", "test/b.png"]))
        write(tmp_path, {"train/metadata.jsonl": jsonl({"file_name": "a.png", "text": "an a"}),
                         "test/metadata.jsonl": jsonl({"file_name": "b.png", "text": "a b"})})
    write(tmp_path, {"cover.png": png(9)})
    source = iter_folder(tmp_path, layout, TEMPLATE, RES)
    samples, skipped = collect(source)
    assert {name: s.split for name, s in samples.items()} == {
        name: split for name, split in zip(sorted(samples), ["val", "train"])}
    assert [(s.source, s.reason) for s in skipped] == [("cover.png", "missing_caption")]
    # Given a caption, it would be read: refused, as before.
    captions = {"metadata": {"metadata.jsonl": jsonl({"file_name": "cover.png", "text": "the cover"})},
                "captions": {"cover.txt": "the cover"}, "classes": {"more/cover/c.png": png(8)}}[layout]
    write(tmp_path, captions)
    with pytest.raises(SourceError, match="1 image is outside them"):
        iter_folder(tmp_path, layout, TEMPLATE, RES)


@pytest.mark.parametrize("names, note", [
    (["train/a.png", "train/b.png"], "train/ without a test/ or validation/ folder beside it"),
    (["test/a.png", "test/b.png"], "test/ without a train/ folder beside it"),
    # test/ holds no image: nothing to hold out, and said so (it is there: "without a test/" was wrong)
    (["train/a.png", "test/b.txt"], "train/ beside test/, which holds no image: not taken as splits"),
    (["test/a.png", "train/metadata.txt"], "test/ beside train/, which holds no image"),
    (["training/a.png", "Test/b.png", "test-2/c.png"], "training/ without a test/"),  # names matched exactly
])
def test_without_both_a_train_and_a_held_out_folder_the_images_are_hashed(tmp_path, names, note):
    write(tmp_path, captioned(names))
    source = iter_folder(tmp_path, "captions", TEMPLATE, RES)
    assert source.splits is None and note in source.splits_note
    assert set(splits_of(tmp_path, "captions").values()) == {""}


def test_an_empty_held_out_folder_is_said_to_hold_no_image(tmp_path):
    """A test/ with nothing in it at all (not even in the listing, which holds files) is there, not missing."""
    write(tmp_path, captioned(["train/a.png"]))
    (tmp_path / "test").mkdir()
    note = iter_folder(tmp_path, "captions", TEMPLATE, RES).splits_note
    assert note == "train/ beside test/, which holds no image: not taken as splits"


@pytest.mark.parametrize("names, hint", [
    (["Train/a.png", "Test/b.png"], ("Test/ and Train/ look like split folders: split names are matched in "
                                     "lowercase (rename them test/ and train/ to keep that split)")),
    (["train/a.png", "Test/b.png"], ("train/ without a test/ or validation/ folder beside it: not taken as splits; "
                                     "Test/ looks like a split folder: split names are matched in lowercase "
                                     "(rename it test/ to keep that split)")),
    (["data/train/a.png", "data/test/b.png"], ("data/test/ and data/train/ look like split folders: point "
                                               "shard.path at {root}/data to keep that split")),
])
def test_folders_that_look_like_splits_but_do_not_match_are_hinted_at(tmp_path, names, hint):
    """Matching stays exact, as documented; but Train/ or data/train/ were hashed without a word."""
    write(tmp_path, captioned(names))
    source = iter_folder(tmp_path, "captions", TEMPLATE, RES)
    assert source.splits is None and hint.format(root=tmp_path) in source.splits_note, source.splits_note


def test_one_split_folder_one_level_down_is_not_hinted_at(tmp_path):
    write(tmp_path, captioned(["data/train/a.png", "data/other/b.png"]))
    assert iter_folder(tmp_path, "captions", TEMPLATE, RES).splits_note is None


@pytest.mark.parametrize("held_out", ["test", "validation"])
def test_an_image_in_both_train_and_the_held_out_folder_is_kept_there(tmp_path, held_out):
    """The same pixels in train/ and the held-out folder: the held-out copy is kept, whichever sorts first
    (test/ sorts before train/, validation/ after: path order kept the validation copy out), so the user's
    held-out set is as given and the image is never on both sides; the other train images keep their order."""
    write(tmp_path, {"train/a.png": png(1), "train/a.txt": "an a", "train/b.png": png(2), "train/b.txt": "a b",
                     "train/c.png": png(3), "train/c.txt": "a c",
                     f"{held_out}/copy.png": png(1), f"{held_out}/copy.txt": "a copy of a"})
    samples, skipped = collect(iter_folder(tmp_path, "auto", TEMPLATE, RES))
    assert list(samples) == [f"{held_out}/copy.png", "train/b.png", "train/c.png"]
    assert {name: s.split for name, s in samples.items()} == {
        f"{held_out}/copy.png": "val", "train/b.png": "train", "train/c.png": "train"}
    assert [(s.source, s.reason, s.detail) for s in skipped] == [
        ("train/a.png", "duplicate", f"same pixels as {held_out}/copy.png")]


def test_an_image_in_both_train_and_test_is_kept_once_on_the_held_out_side(tmp_path):
    """The same pixels in train/ and test/: the held-out copy is kept, so the image is never on both sides of
    the split."""
    write(tmp_path, {"train/a.png": png(1), "train/a.txt": "an a", "train/b.png": png(2), "train/b.txt": "a b",
                     "test/copy.png": png(1), "test/copy.txt": "a copy of a"})
    samples, skipped = collect(iter_folder(tmp_path, "auto", TEMPLATE, RES))
    assert {name: s.split for name, s in samples.items()} == {"test/copy.png": "val", "train/b.png": "train"}
    assert [(s.source, s.reason, s.detail) for s in skipped] == [
        ("train/a.png", "duplicate", "same pixels as test/copy.png")]
