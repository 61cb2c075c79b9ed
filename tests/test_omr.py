"""pdl.omr (format, corpus, engrave, patches): generation offline, ground-truth invariants on every page,
determinism, resume, crash tolerance, the dataset folder's layout and permissions, and a lossless round trip of the
real DeepScoresV2 sample page."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pdl.core import PdlError
from pdl.omr import corpus as C
from pdl.omr import engrave as E
from pdl.omr import format as F
from pdl.omr import patches as P
from pdl.omr.classes import categories_json

COLLECTIONS = ["bach", "essenFolksong"]      # small chorales (MusicXML) and multi-tune ABC files (via music21)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "a"
    report = E.generate(out, pages=3, seed=7, workers=2, pages_per_piece=1, collections=COLLECTIONS,
                        test_fraction=0.3, show_progress=False)
    return out, report


def _check_page(ds: F.DeepScores, index: int) -> int:
    """Every annotation of a page: its instance pixels lie in its a_bbox and o_bbox, number at most `area`,
    carry its class colour; the o_bbox is no larger than the a_bbox."""
    image = ds.images[index]
    inst = ds.load_instances(index)
    seg = ds.load_segmentation(index)
    assert inst.shape == seg.shape == (image["height"], image["width"])
    anns = ds.image_annotations(image)
    by_instance = {}
    for a in anns:
        comments = F.parse_comments(a["comments"])
        by_instance[int(comments["instance"][1:], 16)] = a
        x0, y0, x1, y1 = a["a_bbox"]
        box = np.array(a["o_bbox"]).reshape(4, 2)
        area_o = 0.5 * abs(np.dot(box[:, 0], np.roll(box[:, 1], 1)) - np.dot(box[:, 1], np.roll(box[:, 0], 1)))
        assert area_o <= (x1 - x0) * (y1 - y0) + 1e-3, a
        assert a["area"] > 0 and a["cat_id"][0] in ds.categories
    ys, xs = np.nonzero(inst)
    ids = inst[ys, xs]
    assert set(np.unique(ids)) <= set(by_instance), "instance ids without an annotation"
    centres = np.stack([xs + 0.5, ys + 0.5], axis=1)
    order = sorted(by_instance)
    lut = {k: i for i, k in enumerate(order)}
    idx = np.array([lut[i] for i in ids]) if len(ids) else np.zeros(0, int)
    a_boxes = np.array([by_instance[k]["a_bbox"] for k in order])
    o_boxes = np.array([by_instance[k]["o_bbox"] for k in order]).reshape(-1, 4, 2)
    colours = np.array([ds.categories[by_instance[k]["cat_id"][0]]["color"] for k in order])
    # inside the axis-aligned box
    ab = a_boxes[idx]
    assert ((centres[:, 0] >= ab[:, 0]) & (centres[:, 0] <= ab[:, 2]) &
            (centres[:, 1] >= ab[:, 1]) & (centres[:, 1] <= ab[:, 3])).all()
    # inside the oriented box: project onto its two edge directions
    p0, p1, p3 = o_boxes[:, 0], o_boxes[:, 1], o_boxes[:, 3]
    for edge in (p1 - p0, p3 - p0):
        length = np.linalg.norm(edge, axis=1)
        unit = edge / np.maximum(length, 1e-9)[:, None]
        t = np.einsum("ij,ij->i", centres - p0[idx], unit[idx])
        assert (t >= -1e-3).all() and (t <= length[idx] + 1e-3).all()
    # pixel counts and class colours
    counts = np.bincount(idx, minlength=len(order))
    assert (counts <= np.array([by_instance[k]["area"] for k in order])).all()
    assert (seg[ys, xs] == colours[idx]).all()
    assert (seg[inst == 0] == 0).all()
    return len(anns)


def test_generated_pages_satisfy_ground_truth_invariants(dataset):
    out, report = dataset
    assert sum(report.pages.values()) == 3 and not report.failed
    n = 0
    for split in ("train", "test"):
        ds = F.read_deepscores(out, split)
        for i in range(len(ds.images)):
            n += _check_page(ds, i)
            assert ds.load_image(i).shape == (ds.images[i]["height"], ds.images[i]["width"])
    assert n > 50
    meta = E.read_pages(out)
    assert {m["piece"]["collection"] for m in meta} <= set(COLLECTIONS)


def test_same_seed_gives_byte_identical_json(dataset, tmp_path):
    out, _ = dataset
    E.generate(tmp_path / "b", pages=3, seed=7, workers=1, pages_per_piece=1, collections=COLLECTIONS,
               test_fraction=0.3, show_progress=False)
    for split in ("train", "test"):
        assert (out / f"deepscores_{split}.json").read_bytes() == (tmp_path / "b" / f"deepscores_{split}.json").read_bytes()


def test_piece_split_is_disjoint_and_never_empty():
    def fake(pieces):                 # pages named like generate() names them, two pages per piece
        names = [f"{i:06d}-piece{i}-leipzig-page-{n}.png" for i in range(pieces) for n in (1, 2)]
        return F.DeepScores(Path("."), dict(images=[dict(filename=f) for f in names], annotations={}, categories={}))
    for pieces in (2, 3, 5, 12):
        for seed in range(20):
            ds = fake(pieces)
            split = P.split_pieces(ds, 0.2, seed)
            assert split["test"] and split["train"]
            piece = lambda i, ds=ds: ds.images[i]["filename"].rsplit("-page-", 1)[0]
            assert not {piece(i) for i in split["test"]} & {piece(i) for i in split["train"]}
            assert sorted(split["test"] + split["train"]) == list(range(2 * pieces))
    with pytest.raises(PdlError, match="cannot split"):
        P.split_pieces(fake(1), 0.2, 0)


def test_interrupted_generation_resumes(dataset, tmp_path):
    out, _ = dataset
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    records = sorted((copy / "work" / "pieces").glob("*.json"))
    # with two workers a piece beyond the last one needed may have been engraved too (it was in flight when the
    # last needed page arrived): lose a piece whose page is in the dataset, as if the run had stopped before it
    used = [r for r in records if json.loads(r.read_text()).get("pages")]
    lost = used[0]
    lost.unlink()
    for split in ("train", "test"):
        (copy / f"deepscores_{split}.json").unlink()
    report = E.generate(copy, pages=3, seed=7, workers=2, pages_per_piece=1, collections=COLLECTIONS,
                        test_fraction=0.3, show_progress=False)
    assert lost.exists() and report.engraved >= 1 and report.reused >= len(used) - 1
    for split in ("train", "test"):
        assert (copy / f"deepscores_{split}.json").read_bytes() == (out / f"deepscores_{split}.json").read_bytes()
    with pytest.raises(PdlError, match="other settings"):
        E.generate(copy, pages=3, seed=8, workers=1, collections=COLLECTIONS, show_progress=False)


CRASH_SCENARIO = """
import json, multiprocessing, os, shutil, sys
from pathlib import Path
from pdl.omr import corpus as C, engrave as E
corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
(corpus / "mine").mkdir(parents=True)
(corpus / "mine" / "garbage.xml").write_text("<score-partwise><this is not music")
shutil.copy(C.corpus_root() / "bach" / "bwv66.6.mxl", corpus / "mine" / "good.mxl")
shutil.copy(C.corpus_root() / "bach" / "bwv66.6.mxl", corpus / "mine" / "segfault.mxl")
pieces = [C.Piece("mine", "mine/garbage.xml"), C.Piece("mine", "mine/good.mxl"), C.Piece("mine", "mine/segfault.mxl")]
real = E.engrave_piece
def crashing(task, out, root):  # verovio can die of a signal: simulate it in the worker
    if "segfault" in task.piece.path:
        os.kill(os.getpid(), 11)
    return real(task, out, root)
E.engrave_piece = crashing
E.worker_context = lambda: multiprocessing.get_context("fork")  # so the patched function reaches the workers
report = E.generate(out, pages=3, seed=0, workers=2, pages_per_piece=1, pieces=pieces, corpus=corpus,
                    test_fraction=0.0, show_progress=False)
print(json.dumps(dict(pages=report.pages, failed=dict(report.failed))))
"""


def test_bad_and_crashing_inputs_are_skipped(tmp_path):
    # a clean interpreter: forking this test process (which may run threads by now) could deadlock
    result = subprocess.run([sys.executable, "-c", CRASH_SCENARIO, str(tmp_path / "corpus"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PDL_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sum(report["pages"].values()) == 1
    assert "verovio" in report["failed"]["mine/garbage.xml"]
    assert "crashed (signal 11)" in report["failed"]["mine/segfault.mxl"]
    assert "skipped piece mine/garbage.xml" in result.stderr and "skipped piece mine/segfault.mxl" in result.stderr


def test_real_sample_round_trips(tmp_path):
    sample = F.reference_sample()
    ds = F.read_deepscores(sample)
    assert len(ds.images) == 1 and len(ds.annotations) == 547 and len(ds.categories) == 208
    written = F.write_deepscores_json(tmp_path / "copy.json", ds)
    assert written.read_bytes() == (sample / "deepscores_v2_sample.json").read_bytes()
    again = F.read_deepscores(written)
    assert again.data == ds.data
    image, seg = ds.load_image(0), ds.load_segmentation(0)
    assert image.shape == seg.shape == (3828, 2707)
    # our category table is the sample's
    assert categories_json() == ds.categories


def test_reference_sample_lookup_order(tmp_path, monkeypatch):
    vendored = F.reference_sample()
    assert vendored.parts[-3:] == ("data", "reference", "deepscores_v2_sample")   # the copy in the project wins
    monkeypatch.setenv("PDL_ROOT", str(tmp_path / "project"))                    # a project without the copy
    monkeypatch.setenv("PDL_DEEPSCORES_SAMPLE", str(vendored.parent))             # the folder above also works
    assert F.reference_sample() == vendored
    monkeypatch.setenv("PDL_DEEPSCORES_SAMPLE", str(tmp_path / "nowhere"))
    with pytest.raises(PdlError, match="PDL_DEEPSCORES_SAMPLE") as err:
        F.reference_sample()
    assert "data/reference/deepscores_v2_sample" in str(err.value)


def test_patches_and_cli(dataset, capsys):
    out, _ = dataset
    patches, names, sources = P.extract_patches(F.read_deepscores(out, "train"), max_per_class=5)
    assert patches.dtype == np.uint8 and patches.shape[1:] == P.PATCH_SIZE == (45, 170)
    assert len(names) == len(sources) == len(patches) > 0
    assert E.cli_main(["info", str(out), "--split", "train"]) == 0
    assert "annotations" in capsys.readouterr().out
    splits = sorted(p.name for p in out.glob("deepscores_*.json"))
    assert E.cli_main(["info", str(out)]) == 0                 # a folder: every split, one summary line each
    lines = [line for line in capsys.readouterr().out.splitlines() if "annotations" in line]
    assert [line.split(":")[0].rsplit("/", 1)[-1] for line in lines] == splits
    with pytest.raises(SystemExit):
        E.cli_main(["generate", "--out", str(out), "--fonts", "Nope"])
    assert E.cli_main(["info", str(out / "nowhere")]) == 2


def test_utf16_musicxml_is_engraved():
    """The corpus' Monteverdi madrigals are UTF-16 MusicXML, which verovio rejects; they are re-declared as UTF-8."""
    import verovio
    root = C.corpus_root()
    piece = C.Piece("monteverdi", "monteverdi/madrigal.4.17.mxl")
    assert not verovio.toolkit(False).loadFile(str(root / piece.path))       # what verovio does on its own
    tk = E._toolkit("Leipzig", 9.0)
    C.load_piece(tk, piece, root)
    assert tk.getPageCount() >= 1
    assert C._utf16_musicxml(root / "bach/bwv66.6.mxl") is None            # UTF-8 files are left to verovio


def test_rare_first_puts_feature_pieces_first_and_wants_their_classes():
    pieces = C.corpus_pieces()
    features = C.corpus_features()
    assert len(features["fingering"]) >= 1 and len(features["octave clef"]) >= 10
    assert features["caesura"] == []                          # absent from the corpus: explains a missing class
    plan = C.rare_first(pieces, seed=0)
    assert len(plan) == len(pieces) and len({p for p, _ in plan}) == len(pieces)     # a reordering, nothing lost
    wanting = [(p, w) for p, w in plan if w]
    assert plan[:len(wanting)] == wanting                     # feature pieces first
    fingering = [p for p, w in wanting if "fingering1" in w]
    assert fingering and all(p.path in features["fingering"] for p in fingering)
    assert C.rare_first(pieces, seed=0) == plan               # deterministic
    with pytest.raises(PdlError, match="unknown piece order"):
        E.plan_tasks(pieces[:3], ["Leipzig"], 0, 1, 100.0, order="random")


def test_wanted_classes_choose_the_pages(tmp_path):
    """A task that wants fingerings keeps a page holding them (the second: this piece has none on its first); the
    same task without wants keeps page 1."""
    piece = C.Piece("schumann_clara", "schumann_clara/polonaise_op1n1.mxl")
    root = C.corpus_root()
    classes = tuple(f"fingering{d}" for d in range(6))
    wanting = E.engrave_piece(E.EngraveTask(0, piece, "Leland", 9.0, 1, 80.0, classes), tmp_path, root)
    plain = E.engrave_piece(E.EngraveTask(1, piece, "Leland", 9.0, 1, 80.0), tmp_path, root)
    assert plain["pages"][0]["page"] == 1
    assert not any(a[0] in classes for a in plain["pages"][0]["annotations"])
    assert wanting["pages"][0]["page"] == 2
    assert any(a[0] in classes for a in wanting["pages"][0]["annotations"])


def test_streamed_json_matches_the_published_layout(tmp_path):
    """The streaming writer (constant memory at any dataset size) writes what `write_deepscores_json` writes."""
    head = dict(info=dict(description="x", year=2020), annotation_sets=["deepscores", "muscima++"],
                categories=categories_json())
    anns = [("1", dict(a_bbox=[1.0, 2.0, 3.5, 4.0], o_bbox=[1.0, 2.0, 3.0, 2.0, 3.0, 4.0, 1.0, 4.125],
                       cat_id=["25", None], area=7, img_id="1", comments="instance:#000001;onset:0.5")),
            ("2", dict(a_bbox=[0.0, 0.0, 1.0, 1.0], o_bbox=[], cat_id=["2", "140"], area=1, img_id="1",
                       comments="instance:#000002"))]
    image = dict(id=1, filename="p.png", width=10, height=20, ann_ids=["1", "2"])
    for images, annotations in (([image], anns), ([], [])):
        writer = F.DeepScoresWriter(tmp_path / "d.json", head)
        for img in images:
            writer.add(img, annotations)
        writer.close()
        expected = F.dumps_deepscores(dict(head, images=images, annotations=dict(annotations)))
        assert (tmp_path / "d.json").read_text() == expected
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]       # no partial files left


def test_concurrent_generations_of_one_folder_wait_for_each_other(dataset, tmp_path):
    """Two callers generating the same folder at once (chapter 7's workers building the patch cache) must not
    corrupt it: the second waits for the lock, then reuses every record and writes the same bytes."""
    import threading
    src, _ = dataset
    out, errors = tmp_path / "same", []

    def run():
        try:
            E.generate(out, pages=3, seed=7, workers=1, pages_per_piece=1, collections=COLLECTIONS,
                       test_fraction=0.3, show_progress=False)
        except Exception as err:          # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for split in ("train", "test"):
        assert (out / f"deepscores_{split}.json").read_bytes() == (src / f"deepscores_{split}.json").read_bytes()
    assert not list(out.glob(".*.partial"))


def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    """`pdl deepscores generate --out X` where X cannot be written: a message with a hint and status 2, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert E.cli_main(["generate", "--out", str(blocker / "ds"), "--pages", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the dataset folder" in err and "hint:" in err and "Traceback" not in err
    if os.geteuid() != 0:                          # root may write anywhere: a read-only folder stops only others
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert E.cli_main(["generate", "--out", str(locked / "ds"), "--pages", "1"]) == 2
        assert "cannot write the dataset folder" in capsys.readouterr().err


def test_generated_root_has_the_deepscores_layout_and_one_file_mode(dataset):
    """Only the split files and the three image folders (plus the bookkeeping folder `work/`) at the root, and
    every file with the same (umask-respecting) permissions, the temporary-file helper's 0600 included."""
    out, _ = dataset
    assert sorted(p.name for p in out.iterdir()) == ["deepscores_test.json", "deepscores_train.json", "images",
                                                     "instance", "segmentation", "work"]
    modes = {f.relative_to(out).as_posix(): f.stat().st_mode & 0o777 for f in out.rglob("*") if f.is_file()}
    assert "work/pages.json" in modes and "work/config.json" in modes
    assert len(set(modes.values())) == 1, modes
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}


def test_a_folder_in_the_earlier_layout_resumes_and_moves_to_the_new_one(dataset, tmp_path):
    """Folders generated before `pages.json` moved under `work/` resume without engraving anything again; the
    bookkeeping file moves to `work/`."""
    out, _ = dataset
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "work" / "pages.json").rename(old / "pages.json")
    assert E.read_pages(old) == E.read_pages(out)               # readable in the earlier layout too
    report = E.generate(old, pages=3, seed=7, workers=2, pages_per_piece=1, collections=COLLECTIONS,
                        test_fraction=0.3, show_progress=False)
    assert report.engraved == 0
    assert not (old / "pages.json").exists() and E.read_pages(old) == E.read_pages(out)
    for split in ("train", "test"):
        assert (old / f"deepscores_{split}.json").read_bytes() == (out / f"deepscores_{split}.json").read_bytes()


@pytest.mark.slow
def test_load_patches_builds_once_and_serves_disjoint_splits(tmp_path, monkeypatch):
    """`deepscores_patches`: one versioned cache file built through `pdl.core.cached`, read again on the next call;
    both splits share the class list and never share a piece."""
    monkeypatch.setenv("PDL_CACHE_DIR", str(tmp_path))
    train = P.load_patches("train", pages=4, max_per_class=5, seed=0, workers=2)
    cache = Path(train["info"]["cache"])
    assert cache.name == f"patches-45x170-p4-m5-s0.v{P.PATCHES_FORMAT}.npz"
    built = cache.stat().st_mtime_ns
    test = P.load_patches("test", pages=4, max_per_class=5, seed=0, workers=2)
    assert cache.stat().st_mtime_ns == built                                  # served from the cache
    assert train["classes"] == test["classes"] and len(train["images"]) and len(test["images"])
    assert train["images"].shape[1:] == test["images"].shape[1:] == P.PATCH_SIZE
    assert train["labels"].max() < len(train["classes"]) and test["labels"].max() < len(test["classes"])
    piece = lambda page: page.rsplit("-page-", 1)[0]
    assert not {piece(g) for g in train["groups"]} & {piece(g) for g in test["groups"]}
    with pytest.raises(PdlError, match="unknown split"):
        P.load_patches("valid")
