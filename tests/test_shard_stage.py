"""The `shard` stage end to end: the CLI, byte-identical reruns, a user's folder with bad files, bad params."""

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli
from test_sources import BAD_REASONS, EXTRA, caption_of, flat_tree, good_paths, write

from diffusion.config import ConfigError
from diffusion.data.shard_reading import iter_shards
from diffusion.data.tokenizer import load_tokenizer
from diffusion.data_configs import ShardConfig
from pipeline import shard as stage

TINY = {
    "resolution": 16, "samples_per_shard": 40, "vocab_size": 64, "max_length": 16,
    "shapes": {"num_train": 90, "num_val": 20, "holdout": ["purple triangle"]},
}


def tiny_params(tmp_path: Path, **shard) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["shard"].update(TINY | shard)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_cli_shard_writes_shards_tokenizer_manifest_identically_twice(tmp_path, cli_env):
    tiny_params(tmp_path)
    first = run_cli(["shard"], tmp_path, cli_env)
    assert "wrote 90 train and 20 val samples" in first.stdout
    assert "MLflow run" in first.stdout
    data = tmp_path / "data"
    before = digests(data)
    assert sorted(p for p in before if p.endswith(".tar")) == [
        "shards/train/shard-000000.tar", "shards/train/shard-000001.tar", "shards/train/shard-000002.tar",
        "shards/val/shard-000000.tar",
    ]
    run_cli(["shard"], tmp_path, cli_env)
    assert digests(data) == before, "a rerun must write byte-identical files"

    manifest = json.loads((data / "shards" / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 90, "val": 20}
    assert sum(manifest["skipped"].values()) == 0
    with tarfile.open(data / "shards" / "train" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert len(members) == 40 * 3 and all(m.mtime == 0 for m in members)
    assert {Path(m.name).suffix for m in members} == {".png", ".txt", ".json"}

    samples = list(iter_shards(sorted(str(p) for p in (data / "shards" / "val").glob("*.tar"))))
    assert samples[0]["image"].shape == (3, 16, 16)
    assert all("attributes" in s["meta"] for s in samples)
    train = list(iter_shards(sorted(str(p) for p in (data / "shards" / "train").glob("*.tar"))))
    combos = {(s["meta"]["attributes"]["color"], s["meta"]["attributes"]["shape"]) for s in train}
    assert ("purple", "triangle") not in combos, "a held-out combination leaked into train"

    tok = load_tokenizer(data / "tokenizer.json")
    ids = tok.encode(train[0]["caption"]).ids
    assert len(ids) == 16 and ids[0] == 2 and 1 not in ids, "train captions tokenize without [UNK]"


def test_user_folder_counts_every_bad_file_and_keeps_every_good_image(tmp_path):
    src = tmp_path / "photos"
    tree = flat_tree()
    write(src, tree)
    for path in tree:  # side-car captions for everything but the two caption cases
        if Path(path).suffix.lower() in {".png", ".jpg", ".gif", ".webp"} and Path(path).name != "uncaptioned.png":
            write(src, {str(Path(path).with_suffix(".txt")): caption_of(path)})
    write(src, {"blank_caption.txt": "   \n"})
    cfg = ShardConfig.from_dict(
        TINY | {"source": "folder", "path": str(src), "val_fraction": 0.3,
                "out_dir": str(tmp_path / "out"), "tokenizer_path": str(tmp_path / "out" / "tok.json")}
    )
    manifest = stage.run(cfg)

    expected = {reason: 0 for reason in manifest["skipped"]}
    expected.update(BAD_REASONS, duplicate=1, missing_caption=1, empty_caption=1, unsupported_format=1)
    assert manifest["skipped"] == expected
    assert set(manifest["skipped_examples"]) == {r for r, n in expected.items() if n}
    captions = [
        s["caption"] for split in ("train", "val")
        for s in iter_shards(sorted(str(p) for p in (tmp_path / "out" / split).glob("*.tar")))
    ]
    assert sorted(captions) == sorted(caption_of(p) for p in good_paths(tree))
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == len(good_paths(tree))
    assert manifest["counts"]["val"] > 0
    assert len(EXTRA) == 3


def test_source_with_no_usable_image_stops_and_writes_nothing(tmp_path, cli_env):
    src = tmp_path / "junk"
    write(src, {"a.png": b"", "b.jpg": b"not an image", "a.txt": "cap", "b.txt": "cap"})
    tiny_params(tmp_path, source="folder", path=str(src))
    proc = run_cli(["shard"], tmp_path, cli_env, check=False)
    assert proc.returncode == 1
    assert "no usable image" in proc.stderr and "empty_file=1" in proc.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.tar"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("shard.colour=red", "shard.colour"),
        ("shard.shapes.num_train=-5", "shard.shapes.num_train"),
        ("shard.source=imagenet", "shard.source"),
        ("shard.shapes.holdout=[purple hexagon]", "shard.shapes.holdout"),
        ("shard.path=my_images", "shard.path"),  # set, but source is still shapes
    ],
)
def test_bad_parameter_exits_2_naming_the_key_and_touches_nothing(tmp_path, cli_env, override, key):
    tiny_params(tmp_path)
    out = tmp_path / "data" / "shards"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("previous output")
    proc = run_cli(["shard", "-S", override], tmp_path, cli_env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr
    assert [p.name for p in (tmp_path / "data").rglob("*")] == ["shards", "keep.txt"]
    assert not (tmp_path / "mlflow.db").exists()


def test_an_output_folder_holding_other_files_is_refused_and_kept(tmp_path, cli_env):
    """The stage replaces its whole output folder: pointed at a folder of the user's own files (here, its own
    input images, or the project folder itself) it must stop before touching them."""
    tiny_params(tmp_path)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.txt").write_text("a caption")
    for out_dir in (str(images), "."):
        proc = run_cli(["shard", "-S", f"shard.out_dir={out_dir}"], tmp_path, cli_env, check=False)
        assert proc.returncode == 2 and "shard.out_dir" in proc.stderr and "not what is written there" in proc.stderr, \
            proc.stderr
    assert sorted(p.name for p in images.iterdir()) == ["0.txt", "1.txt", "2.txt"]
    assert (tmp_path / "params.yaml").is_file() and not (tmp_path / "mlflow.db").exists()
    # Its own previous output is replaced as before; a tokenizer path under a file is refused too.
    run_cli(["shard"], tmp_path, cli_env)
    run_cli(["shard"], tmp_path, cli_env)
    proc = run_cli(["shard", "-S", "shard.tokenizer_path=params.yaml/tok.json"], tmp_path, cli_env, check=False)
    assert proc.returncode == 2 and "shard.tokenizer_path" in proc.stderr, proc.stderr


def test_check_replaceable(tmp_path):
    from diffusion.atomic import check_replaceable

    own = ("model.pt", "config.json")
    check_replaceable(tmp_path / "new", own, "k")  # missing: fine
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.pt").write_bytes(b"")
    check_replaceable(tmp_path / "m", own, "k")  # only its own files: fine
    (tmp_path / "m" / "vae").mkdir()
    # Named after the key, not "this stage": save_pretrained (a Python call) is refused with this message too.
    with pytest.raises(ConfigError, match=r"k: .* holds vae/, which is not what is written there \(model.pt, "
                                          r"config.json\); the whole folder is replaced"):
        check_replaceable(tmp_path / "m", own, "k")
    with pytest.raises(ConfigError, match="is a file"):
        check_replaceable(tmp_path / "m" / "model.pt", own, "k")


def test_check_replaceable_takes_a_folder_as_its_own_only_holding_what_is_written_there(tmp_path):
    """train/ and val/ are the shard stage's folders only when they hold its shards: a dataset split into
    train/ and val/ folders of images was taken for its output and deleted."""
    from diffusion.atomic import check_replaceable

    own = stage.SHARD_ENTRIES
    write(tmp_path / "ds", {"train/a.png": b"x", "val/b.png": b"y", "train/metadata.jsonl": "{}"})
    with pytest.raises(ConfigError, match=r"shard.out_dir: .* holds train/a.png, val/b.png, which is not"):
        check_replaceable(tmp_path / "ds", own, "shard.out_dir")
    # Its own output (shards, an empty val/, the manifest) is replaceable; one stray file in it is not.
    write(tmp_path / "out", {"train/shard-000000.tar": b"", "manifest.json": "{}", "skipped.jsonl": ""})
    (tmp_path / "out" / "val").mkdir()
    check_replaceable(tmp_path / "out", own, "shard.out_dir")
    write(tmp_path / "out", {"train/notes.txt": "mine"})
    with pytest.raises(ConfigError, match="holds train/notes.txt, which"):
        check_replaceable(tmp_path / "out", own, "shard.out_dir")
    # A tokenizer written in a folder inside out_dir is its own too (the stage passes its relative path).
    write(tmp_path / "tok", {"sub/tokenizer.json": "{}", "train/shard-000001.tar": b""})
    check_replaceable(tmp_path / "tok", (*own, "sub/tokenizer.json"), "shard.out_dir")


def test_a_split_source_folder_given_as_out_dir_is_refused_and_kept(tmp_path, cli_env):
    """The walkthrough: path and out_dir both ds/S_copy, which holds train/ and val/ with a metadata.jsonl
    each; the stage deleted the images and exited 0."""
    src = tmp_path / "ds" / "S_copy"
    hf_split_folder(src, {"train": 3, "val": 2})
    before = digests(src)
    tiny_params(tmp_path, source="folder")
    for out_dir in ("ds/S_copy", "ds/S_copy/", "./ds/S_copy/shards", "ds"):
        proc = run_cli(["shard", "-S", "shard.path=ds/S_copy", "-S", f"shard.out_dir={out_dir}"], tmp_path, cli_env,
                       check=False)
        assert proc.returncode == 2 and "shard.out_dir" in proc.stderr and "shard.path=ds/S_copy" in proc.stderr, \
            proc.stderr
        assert digests(src) == before
    assert not (tmp_path / "mlflow.db").exists()


def test_outputs_must_be_apart_from_the_inputs(tmp_path):
    """Checked before any work: resolved paths, for a folder and for tars (out_dir holding one of the input
    tars; the tokenizer written over one)."""
    write(tmp_path / "imgs", {"a.png": write_png(1), "a.txt": "an a"})
    base = TINY | {"source": "folder", "path": str(tmp_path / "imgs"), "out_dir": str(tmp_path / "out"),
                   "tokenizer_path": str(tmp_path / "tok.json")}
    stage.validate(ShardConfig.from_dict(base))
    with pytest.raises(ConfigError, match=r"shard.tokenizer_path: .* lies inside the source folder"):
        stage.validate(ShardConfig.from_dict(base | {"tokenizer_path": str(tmp_path / "imgs" / "tok.json")}))
    with pytest.raises(ConfigError, match=r"shard.out_dir: .* holds the source folder shard.path="):
        stage.validate(ShardConfig.from_dict(base | {"out_dir": str(tmp_path)}))
    stage.run(ShardConfig.from_dict(TINY | {"out_dir": str(tmp_path / "shapes"),
                                             "tokenizer_path": str(tmp_path / "tok.json")}))
    tars = TINY | {"source": "webdataset", "path": str(tmp_path / "shapes" / "train" / "*.tar"),
                   "out_dir": str(tmp_path / "out"), "tokenizer_path": str(tmp_path / "tok2.json")}
    stage.validate(ShardConfig.from_dict(tars))
    with pytest.raises(ConfigError, match=r"shard.out_dir: .* holds .*shard-000000.tar, an input tar of shard.path"):
        stage.validate(ShardConfig.from_dict(tars | {"out_dir": str(tmp_path / "shapes")}))
    first = tmp_path / "shapes" / "train" / "shard-000000.tar"
    with pytest.raises(ConfigError, match=r"shard.tokenizer_path: .* is an input tar"):
        stage.validate(ShardConfig.from_dict(tars | {"tokenizer_path": str(first)}))


def test_missing_folder_is_a_bad_parameter(tmp_path):
    cfg = ShardConfig.from_dict({"source": "folder", "path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="shard.path: .*nowhere: no such folder"):
        stage.validate(cfg)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="shard.path: .*a.png is a file; expected the folder"):
        stage.validate(ShardConfig.from_dict({"source": "folder", "path": str(tmp_path / "a.png")}))


def test_source_problems_are_bad_parameters_found_before_any_work(tmp_path):
    """A tar pattern that matches nothing, an empty folder, a folder whose layout cannot be told, a template field
    other than {label}: each a ConfigError naming the key, from validate (before the MLflow run opens)."""
    cases = [
        ({"source": "webdataset", "path": str(tmp_path / "none-{000..002}.tar")}, "shard.path"),
        ({"source": "folder", "path": str(tmp_path / "empty")}, "shard.path: no images found in"),
        ({"source": "folder", "path": str(tmp_path / "flat")}, "shard.folder_layout: .*cannot tell"),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")  # one image, no caption, no subfolder
    for data, key in cases:
        with pytest.raises(ConfigError, match=key):
            stage.validate(ShardConfig.from_dict(data, "shard"))
    with pytest.raises(ConfigError, match="shard.caption_template"):
        ShardConfig.from_dict({"source": "folder", "path": str(tmp_path), "caption_template": "a {label} {kind}"},
                              "shard")


def test_help_documents_the_stage_and_its_parameters(cli_env, tmp_path):
    proc = run_cli(["shard", "--help"], tmp_path, cli_env)
    for text in ("WebDataset", "--set", "shard.resolution", "shard.shapes", "metadata.jsonl"):
        assert text in proc.stdout, text
    # Nested sections key by key, with their own help (they showed as one dict of defaults).
    assert "shard.shapes.holdout (default" in " ".join(proc.stdout.split())
    train = " ".join(run_cli(["train", "--help"], tmp_path, cli_env).stdout.split())
    for text in ("train.scheduler.beta_schedule (default 'linear')", "train.dit.patch_size (default 2)",
                 "train.text_encoder.width", "train.unet.channel_mult"):
        assert text in train, text
    top = run_cli(["--help"], tmp_path, cli_env)
    assert "shard" in top.stdout


def test_help_shows_the_values_params_yaml_and_overrides_set(cli_env, tmp_path):
    """--help showed only the code's defaults (resolution 64) where the run would use params.yaml's (32)."""
    tiny_params(tmp_path, resolution=24)
    text = " ".join(run_cli(["shard", "--help", "-S", "shard.seed=3"], tmp_path, cli_env).stdout.split())
    assert "shard.resolution = 24 (default 64)" in text
    assert "shard.seed = 3 (default 0)" in text
    assert "shard.val_fraction (default 0.05)" in text  # params.yaml sets the default value: no "= value"
    (tmp_path / "params.yaml").unlink()
    text = " ".join(run_cli(["shard", "--help"], tmp_path, cli_env).stdout.split())
    assert "shard.resolution (default 64)" in text and "not read" in text


def _split_sources(out: Path) -> dict[str, set[str]]:
    return {split: {s["meta"]["source"] for s in iter_shards(sorted(str(p) for p in (out / split).glob("*.tar")))}
            for split in ("train", "val")}


def test_an_image_stays_in_its_split_when_others_are_added_or_removed(tmp_path):
    """The split hashes each image's own key: with keys given by position among clashing names (``_``,
    ``__2``, ...), removing one CJK-named image moved others between train and val."""
    from test_folder_source import captioned

    names = [f"{c}.png" for c in "一兔牛狗猫羊马鱼鸟鸡鸭鹅龙虎蛇猴"]
    src = tmp_path / "cjk"
    write(src, captioned(names))

    def run(out: str) -> dict[str, set[str]]:
        stage.run(ShardConfig.from_dict(TINY | {
            "source": "folder", "path": str(src), "val_fraction": 0.5,
            "out_dir": str(tmp_path / out), "tokenizer_path": str(tmp_path / out / "tok.json")}))
        return _split_sources(tmp_path / out)

    before = run("before")
    assert before["val"] and before["train"]
    (src / "一.png").unlink()
    after = run("after")
    assert after == {split: sources - {"一.png"} for split, sources in before.items()}


def test_a_malformed_metadata_file_is_a_bad_parameter_before_any_run_opens(tmp_path, cli_env):
    """Found only once the stage was running, it exited 1 and left a FAILED MLflow run behind."""
    src = tmp_path / "photos"
    rows = '{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png", "text": 5}\n'
    write(src, {"a.png": b"", "metadata.jsonl": rows})
    tiny_params(tmp_path, source="folder", path=str(src))
    proc = run_cli(["shard"], tmp_path, cli_env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "shard.path: " in proc.stderr and "metadata.jsonl, line 2: 'text' must be a string" in proc.stderr
    store = Path(cli_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    assert not store.exists(), "no MLflow run may be opened for a bad source"


def test_nested_metadata_layout_is_printed_and_recorded(tmp_path, capsys):
    src = tmp_path / "hf"
    write(src, {f"train/{i}.png": write_png(i) for i in range(6)})
    write(src, {"train/metadata.jsonl": "".join(
        json.dumps({"file_name": f"{i}.png", "text": f"photo {i}"}) + "\n" for i in range(6))})
    manifest = stage.run(ShardConfig.from_dict(TINY | {
        "source": "folder", "path": str(src), "val_fraction": 0.3,
        "out_dir": str(tmp_path / "out"), "tokenizer_path": str(tmp_path / "out" / "tok.json")}))
    assert manifest["layout"] == "metadata"
    assert "shard: source=folder layout=metadata" in capsys.readouterr().out
    captions = [s["caption"] for split in ("train", "val")
                for s in iter_shards(sorted(str(p) for p in (tmp_path / "out" / split).glob("*.tar")))]
    assert sorted(captions) == [f"photo {i}" for i in range(6)]  # not "a photo of a train" (class folders)


def write_png(seed: int) -> bytes:
    from test_folder_source import png

    return png(seed)


def test_a_stray_caption_among_class_folders_is_named_with_the_layout_it_chose(tmp_path, capsys):
    """One caption file among class folders makes auto pick 'captions'; the stage must say so, naming the file,
    and suggest the classes layout, both when some image survives and when none does."""
    from test_folder_source import png

    src = tmp_path / "pets"
    write(src, {f"{kind}/{i}.png": png(10 * n + i) for n, kind in enumerate(("cats", "dogs")) for i in range(4)})
    write(src, {"cats/with_caption.png": png(99), "cats/with_caption.txt": "a cat with its own caption"})
    cfg = TINY | {"source": "folder", "path": str(src), "val_fraction": 0.0,
                  "out_dir": str(tmp_path / "out"), "tokenizer_path": str(tmp_path / "out" / "tok.json")}
    stage.run(ShardConfig.from_dict(cfg))
    out = capsys.readouterr().out
    assert ("layout=captions (auto: cats/with_caption.txt is a caption beside cats/with_caption.png)" in out
            and "only 1 of 9 images a caption" in out and "-S shard.folder_layout=classes" in out), out
    write(src, {"cats/with_caption.png": b"not an image"})
    with pytest.raises(stage.ShardError) as error:
        stage.run(ShardConfig.from_dict(cfg))
    message = str(error.value)
    for part in ("layout 'captions'", "cats/with_caption.txt is a caption beside cats/with_caption.png",
                 "missing_caption=8", "-S shard.folder_layout=classes"):
        assert part in message, message
    # A metadata.jsonl is there on purpose: what it lacks is rows, not another layout.
    write(src, {"metadata.jsonl": '{"file_name": "cats/0.png", "text": "a cat"}\n'})
    capsys.readouterr()
    stage.run(ShardConfig.from_dict(cfg))
    out = capsys.readouterr().out
    assert "gives only 1 of 9 images a caption; give each image a line" in out and "classes" not in out, out


def test_every_skip_is_written_to_skipped_jsonl_and_logged_to_mlflow(tmp_path, cli_env):
    """The manifest keeps five examples per reason; skipped.jsonl keeps every skip, sorted, with its detail (a
    duplicate names the image kept), in the output folder and as an artifact of the stage's MLflow run."""
    from mlflow.tracking import MlflowClient
    from test_folder_source import png

    src = tmp_path / "photos"
    files = {f"img_{i}.png": png(i) for i in range(8)} | {f"bad_{i}.png": b"" for i in range(7)}
    files |= {"z_copy.png": png(3), "notes.md": "# notes"}
    write(src, files | {f"{Path(n).stem}.txt": f"caption {n}" for n in files if n.endswith(".png")})
    tiny_params(tmp_path, source="folder", path=str(src), val_fraction=0.3)
    proc = run_cli(["shard"], tmp_path, cli_env)
    out = tmp_path / "data" / "shards"
    lines = (out / "skipped.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 9 and rows == sorted(rows, key=lambda r: (r["source"], r["reason"], r["detail"]))
    assert {"source": "z_copy.png", "reason": "duplicate", "detail": "same pixels as img_3.png"} in rows
    assert sum(r["reason"] == "empty_file" for r in rows) == 7  # the manifest lists only 5 of them
    assert len(json.loads((out / "manifest.json").read_text())["skipped_examples"]["empty_file"]) == 5
    run_id = proc.stdout.split("MLflow run ")[1].split()[0]
    client = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    assert {a.path for a in client.list_artifacts(run_id)} >= {"manifest.json", "skipped.jsonl"}
    before = digests(out)
    run_cli(["shard"], tmp_path, cli_env)
    assert digests(out) == before and "skipped.jsonl" in before


def test_the_stage_lists_a_users_folder_once(tmp_path, monkeypatch):
    """validate (before the MLflow run opens) hands the listed folder to run: listing a folder of a million images
    and parsing its metadata takes minutes, and the stage did it three times (validate in main, again in run,
    then for the items)."""
    from test_folder_source import png

    from diffusion.data.sources import folder

    src, listed = tmp_path / "photos", []
    write(src, {f"img_{i}.png": png(i) for i in range(6)} | {f"img_{i}.txt": f"caption {i}" for i in range(6)})
    real = folder._list_files
    monkeypatch.setattr(folder, "_list_files", lambda root: listed.append(root) or real(root))
    manifest = stage.main(ShardConfig.from_dict(TINY | {
        "source": "folder", "path": str(src), "val_fraction": 0.3,
        "out_dir": str(tmp_path / "out"), "tokenizer_path": str(tmp_path / "out" / "tok.json")}))
    assert listed == [src] and manifest["counts"]["train"] + manifest["counts"]["val"] == 6


def test_the_val_split_is_written_as_it_streams_not_held_in_memory(tmp_path):
    """A user source's val images go to their shards as they are read: the stage held them all until the train
    split was written (5% of a million-image folder is ~10 GB of pixels at 256 px). Now none is (at 16 px the
    writer encodes on the producer's thread; from 64 px up, what its threads have in hand: a bounded window)."""
    import weakref

    from PIL import Image

    from diffusion.data.records import Sample

    cfg = ShardConfig.from_dict(TINY | {
        "source": "folder", "path": str(tmp_path), "val_fraction": 0.5, "workers": 2,
        "out_dir": str(tmp_path / "out"), "tokenizer_path": str(tmp_path / "out" / "tok.json")})
    earlier_val: list[weakref.ref] = []
    alive: list[int] = []  # at each read, how many val images read before (but the last) are still in memory

    def items():
        for i in range(60):
            image = Image.new("RGB", (16, 16), (10 * i, 0, 0))
            # The one read just before is still the consumer's loop variable while it asks for the next.
            alive.append(sum(ref() is not None for ref in earlier_val[:-1]))
            if stage._is_val(f"img{i}", cfg):
                earlier_val.append(weakref.ref(image))
            yield Sample(f"img{i}", image, f"a caption {i}")

    manifest = stage.run(cfg, items())
    assert manifest["counts"]["val"] == len(earlier_val) >= 20 and manifest["counts"]["train"] == 60 - len(earlier_val)
    assert max(alive) == 0, alive
    assert sorted(s["key"] for s in iter_shards(str(tmp_path / "out" / "val"))) == sorted(
        f"img{i}" for i in range(60) if stage._is_val(f"img{i}", cfg))


# ------------------------------------------------------------------------------------------ split folders


def hf_split_folder(root: Path, counts: dict[str, int]) -> None:
    """A Hugging Face imagefolder dataset as downloaded: <split>/metadata.jsonl and its images, per split."""
    for n, (split, count) in enumerate(counts.items()):
        write(root, {f"{split}/{i}.png": write_png(100 * n + i) for i in range(count)})
        write(root, {f"{split}/metadata.jsonl": "".join(
            json.dumps({"file_name": f"{i}.png", "text": f"{split} photo {i}"}) + "\n" for i in range(count))})


def _split_keys_and_captions(out: Path) -> dict[str, list[tuple[str, str]]]:
    return {split: sorted((s["key"], s["caption"]) for s in iter_shards(sorted(str(p) for p in (out / split).glob(
        "*.tar")))) for split in ("train", "val")}


@pytest.mark.parametrize("val_fraction", [0.0, 0.9])
def test_hugging_face_train_and_test_folders_are_the_splits_whatever_val_fraction(tmp_path, capsys, val_fraction):
    """Exactly the test/ images are val and the train/ images train: hashed, test images trained the model."""
    src = tmp_path / "hf"
    hf_split_folder(src, {"train": 8, "test": 4})
    manifest = stage.run(ShardConfig.from_dict(TINY | {
        "source": "folder", "path": str(src), "val_fraction": val_fraction,
        "out_dir": str(tmp_path / "out"), "tokenizer_path": str(tmp_path / "out" / "tok.json")}))
    assert _split_keys_and_captions(tmp_path / "out") == {
        "train": [(f"train/{i}", f"train photo {i}") for i in range(8)],
        "val": [(f"test/{i}", f"test photo {i}") for i in range(4)]}
    assert manifest["counts"] == {"train": 8, "val": 4}
    assert manifest["split"] == "folders" and manifest["layout"] == "metadata"
    assert manifest["split_folders"] == {"train": ["train"], "val": ["test"], "not_read": []}
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["split"] == "folders" and on_disk["split_folders"] == manifest["split_folders"]
    out = capsys.readouterr().out
    assert "split by folder: train/ -> train, test/ -> val; shard.val_fraction does not apply" in out, out


def test_a_test_folder_beside_a_validation_folder_is_left_out_and_said(tmp_path, capsys):
    src = tmp_path / "hf"
    hf_split_folder(src, {"train": 5, "validation": 2, "test": 3})
    manifest = stage.run(ShardConfig.from_dict(TINY | {
        "source": "folder", "path": str(src),
        "out_dir": str(tmp_path / "out"), "tokenizer_path": str(tmp_path / "out" / "tok.json")}))
    keys = _split_keys_and_captions(tmp_path / "out")
    assert [k for k, _ in keys["val"]] == ["validation/0", "validation/1"]
    assert [k for k, _ in keys["train"]] == [f"train/{i}" for i in range(5)]
    assert manifest["split_folders"] == {"train": ["train"], "val": ["validation"], "not_read": ["test"]}
    assert sum(manifest["skipped"].values()) == 0  # not read, not skipped: skipped.jsonl stays about bad files
    assert "test/ not read (a test split beside the validation split validation/" in capsys.readouterr().out


def test_only_a_train_folder_is_hashed_by_val_fraction_and_recorded_so(tmp_path, capsys):
    src = tmp_path / "hf"
    hf_split_folder(src, {"train": 12})
    manifest = stage.run(ShardConfig.from_dict(TINY | {
        "source": "folder", "path": str(src), "val_fraction": 0.5,
        "out_dir": str(tmp_path / "out"), "tokenizer_path": str(tmp_path / "out" / "tok.json")}))
    assert manifest["split"] == "hash" and "split_folders" not in manifest
    assert manifest["counts"]["val"] > 0 and manifest["counts"]["train"] > 0
    out = capsys.readouterr().out
    assert ("split by a hash of each image's path, shard.val_fraction 0.5; train/ without a test/ or validation/ "
            "folder beside it: not taken as splits") in out, out


def test_images_beside_split_folders_are_a_bad_parameter_before_any_work_unless_ignored(tmp_path):
    src = tmp_path / "hf"
    hf_split_folder(src, {"train": 6, "test": 2})
    write(src, {"cover.png": write_png(50)})
    cfg = TINY | {"source": "folder", "path": str(src), "val_fraction": 0.5,
                  "out_dir": str(tmp_path / "out"), "tokenizer_path": str(tmp_path / "out" / "tok.json")}
    # No metadata.jsonl lists it: it would be skipped (missing_caption), so it does not stop the stage.
    stage.validate(ShardConfig.from_dict(cfg))
    write(src, {"metadata.jsonl": json.dumps({"file_name": "cover.png", "text": "the cover"}) + "\n"})
    with pytest.raises(ConfigError, match=r"shard.folder_splits: .*1 image is outside them: cover.png"):
        stage.validate(ShardConfig.from_dict(cfg))
    assert not (tmp_path / "out").exists()
    ignored = ShardConfig.from_dict(cfg | {"folder_splits": "ignore"})
    manifest = stage.run(ignored)
    assert manifest["split"] == "hash" and manifest["counts"]["train"] + manifest["counts"]["val"] == 9
    val = [key for key, _ in _split_keys_and_captions(tmp_path / "out")["val"]]
    assert val == sorted(k for k in ["cover", *(f"{s}/{i}" for s, n in (("train", 6), ("test", 2)) for i in range(n))]
                         if stage._is_val(k, ignored))  # hashed, test/ images on either side


def test_a_held_out_folder_that_gives_no_image_stops_the_stage_and_keeps_the_old_output(tmp_path, cli_env):
    """test/ in another layout than train/ (captions beside its images, where train/ has a metadata.jsonl): every
    test image is missing its caption and the stage wrote an empty val split with a warning, exit 0."""
    src = tmp_path / "hf"
    hf_split_folder(src, {"train": 4, "test": 2})
    tiny_params(tmp_path, source="folder", path=str(src))
    run_cli(["shard"], tmp_path, cli_env)
    before = digests(tmp_path / "data")
    (src / "test" / "metadata.jsonl").unlink()
    write(src, {"test/0.txt": "a caption nobody reads", "test/1.txt": "another"})
    proc = run_cli(["shard"], tmp_path, cli_env, check=False)
    assert proc.returncode == 1, proc.stderr
    assert ("shard.path: test/ in " in proc.stderr and "gave no image for the val split (skipped there: "
            "missing_caption=2; read as layout 'metadata')" in proc.stderr), proc.stderr
    assert digests(tmp_path / "data") == before
    assert not list(tmp_path.glob("data/.*"))


def test_folder_splits_is_checked_and_the_built_in_manifest_is_unchanged(tmp_path):
    assert ShardConfig.from_dict({}).folder_splits == "auto"
    assert ShardConfig.from_dict({"folder_splits": "ignore"}).folder_splits == "ignore"
    with pytest.raises(ConfigError, match="shard.folder_splits"):
        ShardConfig.from_dict({"folder_splits": "yes"}, "shard")
    manifest = stage.run(ShardConfig.from_dict(TINY | {
        "shapes": {"num_train": 12, "num_val": 4, "holdout": []},
        "out_dir": str(tmp_path / "out"), "tokenizer_path": str(tmp_path / "out" / "tok.json")}))
    assert "split" not in manifest and "split_folders" not in manifest
