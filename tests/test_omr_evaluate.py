"""pdl.omr.evaluate: AP 1 for perfect proposals in every mode, hand-computed AP for moved, dropped and misplaced
proposals (COCO and toolkit conventions, axis-aligned and oriented), agreement with pycocotools to 1e-6 on random
cases (many detections per page, duplicates, classes without detections or without ground truth), the real sample
page, proposals files, the `pdl omr evaluate` tool and its errors."""
import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pdl.core import PdlError
from pdl.omr.evaluate import (COCO_IOUS, compare_with_pycocotools, evaluate, ground_truth, ground_truth_document,
                              load_proposals, perturbed_detections, synthetic_ground_truth, write_proposals)
from pdl.omr.evaluate import cli_main
from pdl.omr.format import read_deepscores, reference_sample

NOTEHEAD = 27


def _page(boxes, cat=NOTEHEAD, img=1):
    return ground_truth_document(pd.DataFrame({"img_id": img, "cat_id": cat, "bbox": boxes}))


def _dets(boxes, scores, cat=NOTEHEAD, img=1):
    return pd.DataFrame({"img_id": img, "cat_id": cat, "bbox": boxes, "score": scores})


def _ap(gt, dets, column="ap50", **kwargs):
    table = evaluate(gt, dets, **kwargs).per_class.set_index("cat_id")
    return float(table.loc[NOTEHEAD, column])


FOUR = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]]


@pytest.fixture(scope="module")
def sample():
    return ground_truth(read_deepscores(reference_sample()))


# --- perfect proposals ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("oriented", [False, True])
@pytest.mark.parametrize("toolkit", [False, True])
def test_perfect_proposals_score_one_on_the_sample_page(sample, oriented, toolkit):
    perfect = perturbed_detections(sample, oriented=oriented)
    report = evaluate(sample, perfect, iou=(0.5, 0.25, "coco"), toolkit=toolkit)
    for key in ("map50", "map25", "map_coco", "map50_weighted", "map25_weighted", "map_coco_weighted"):
        assert report.summary[key] == pytest.approx(1.0, abs=1e-12), key
    assert report.summary["n_gt"] == 547 and report.summary["n_classes_with_gt"] == 35
    assert np.allclose(report.per_class[["ap50", "ap25", "map_coco"]], 1.0, atol=1e-12)


# --- hand-computed cases ----------------------------------------------------------------------------------------

def test_moved_dropped_and_false_proposals_by_hand():
    # found exactly (0.9), moved 5 px (IoU 1/3, 0.8), false positive (0.7), third missed, fourth exact (0.6)
    dets = _dets([[0, 0, 10, 10], [25, 0, 35, 10], [100, 100, 110, 110], [60, 0, 70, 10]], [0.9, 0.8, 0.7, 0.6])
    gt = _page(FOUR)
    assert _ap(gt, dets, "ap50", iou=(0.5, 0.25)) == pytest.approx((26 + 25 * 0.5) / 101)
    assert _ap(gt, dets, "ap25", iou=(0.5, 0.25)) == pytest.approx((51 + 25 * 0.75) / 101)
    assert _ap(gt, dets, "ap50", iou=(0.5, 0.25), toolkit=True) == pytest.approx(0.25 + 0.25 * 0.5)
    assert _ap(gt, dets, "ap25", iou=(0.5, 0.25), toolkit=True) == pytest.approx(0.5 + 0.25 * 0.75)


def test_dropped_proposals_by_hand():
    dets = _dets(FOUR[:3], [0.9, 0.8, 0.7])            # three of four found exactly: recall 0.75 at precision 1
    assert _ap(_page(FOUR), dets) == pytest.approx(76 / 101)
    assert _ap(_page(FOUR), dets, toolkit=True) == pytest.approx(0.75)
    assert _ap(_page(FOUR), dets, "map_coco", iou="coco") == pytest.approx(76 / 101)


def test_threshold_per_coco_level():
    # a 10 px square moved 1 px right: IoU 90/110 = 0.818 -> true at 0.50..0.80 (7 of 10 COCO thresholds)
    report = evaluate(_page([[0, 0, 10, 10]]), _dets([[1, 0, 11, 10]], [0.5]), iou=(0.8, 0.85, "coco"))
    row = report.per_class.iloc[0]
    assert (row.ap80, row.ap85) == (pytest.approx(1.0), 0.0)
    assert row.map_coco == pytest.approx(0.7)


def test_the_two_conventions_disagree_where_documented():
    gt = _page([[0, 0, 10, 10], [6, 0, 16, 10]])
    dets = _dets([[0, 0, 10, 10], [2, 0, 12, 10]], [0.9, 0.1])
    assert _ap(gt, dets) == pytest.approx(51 / 101)                   # confident box matched first
    assert _ap(gt, dets, toolkit=True) == pytest.approx(0.25)         # sloppy box reserved the symbol first
    # intersection over the enclosing box is below the IoU for a diagonal offset
    one, off = _page([[0, 0, 10, 10]]), _dets([[1.8, 1.8, 11.8, 11.8]], [0.5])
    assert _ap(one, off) == pytest.approx(1.0) and _ap(one, off, toolkit=True) == 0.0
    # a reserved symbol stays lost in the toolkit even when the reservation fails the threshold
    dets = _dets([[3, 0, 13, 10], [0, 0, 10, 10]], [0.1, 0.9])         # the low score (IoU 0.54) chooses first
    assert _ap(one, dets, "ap75", iou=0.75, toolkit=True) == 0.0
    assert _ap(one, dets, "ap75", iou=0.75) == pytest.approx(1.0)


def test_oriented_boxes_by_hand():
    # diamonds |x| + |y| <= 10 around (50, 50): shifting by s along x leaves (20 - s)^2 / 2 of 200 in common
    diamond = lambda cx: [cx + 10, 50, cx, 60, cx - 10, 50, cx, 40]  # noqa: E731
    gt = _page([diamond(50)])
    iou = lambda s: (20 - s) ** 2 / 2 / (400 - (20 - s) ** 2 / 2)   # noqa: E731
    assert iou(5) == pytest.approx(225 / 575)
    for toolkit in (False, True):
        assert _ap(gt, _dets([diamond(55)], [0.5]), "ap25", iou=(0.5, 0.25), toolkit=toolkit) == pytest.approx(1.0)
        assert _ap(gt, _dets([diamond(55)], [0.5]), "ap50", iou=(0.5, 0.25), toolkit=toolkit) == 0.0
        assert _ap(gt, _dets([diamond(52)], [0.5]), "ap50", toolkit=toolkit) == pytest.approx(1.0)   # IoU 0.68
    # corners in any order (here a bow tie) describe the same box
    twisted = _dets([[60, 50, 40, 50, 50, 60, 50, 40]], [0.5])
    assert _ap(gt, twisted) == pytest.approx(1.0)
    # axis-aligned boxes given as 8 corners score like the 4-number boxes
    moved = _dets([[0, 0, 10, 10], [25, 0, 35, 10], [60, 0, 70, 10]], [0.9, 0.8, 0.6])
    corners = moved.assign(bbox=[[b[2], b[3], b[2], b[1], b[0], b[1], b[0], b[3]] for b in moved.bbox])
    assert _ap(_page(FOUR), corners, iou=(0.5, 0.25)) == pytest.approx(_ap(_page(FOUR), moved, iou=(0.5, 0.25)))


def test_classes_without_ground_truth_are_nan_and_flagged():
    dets = pd.concat([_dets(FOUR, [0.9, 0.8, 0.7, 0.6]), _dets([[0, 0, 5, 5]], [0.3], cat=6)])
    report = evaluate(_page(FOUR), dets, iou=(0.5, "coco"), toolkit=False)
    table = report.per_class.set_index("cat_id")
    assert not table.loc[6, "has_gt"] and math.isnan(table.loc[6, "ap50"]) and math.isnan(table.loc[6, "map_coco"])
    assert report.summary["map50"] == pytest.approx(1.0) and report.summary["classes_without_gt"] == [6]
    # classes asked for explicitly appear even without annotations or detections
    table = evaluate(_page(FOUR), dets, classes=[NOTEHEAD, "clefG", 9], toolkit=True).per_class
    assert table.cat_id.tolist() == [NOTEHEAD, 6, 9] and table.has_gt.tolist() == [True, False, False]


def test_empty_proposals_score_zero_for_classes_with_ground_truth():
    gt = ground_truth_document(pd.DataFrame({"img_id": 1, "cat_id": [NOTEHEAD, 42], "bbox": FOUR[:2]}))
    for toolkit in (False, True):
        report = evaluate(gt, _dets([], []), iou=(0.5, "coco"), toolkit=toolkit)
        assert report.per_class.ap50.tolist() == [0.0, 0.0] and report.summary["map_coco"] == 0.0


# --- pycocotools ------------------------------------------------------------------------------------------------

def _pycocotools_per_class(truth, dets: pd.DataFrame) -> np.ndarray:
    """pycocotools' AP (T, K) over COCO_IOUS and sorted classes, built here independently of pdl's converter."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = COCO()
    gt.dataset = {"images": [{"id": int(i)} for i in truth.img_ids],
                  "categories": [{"id": k} for k in sorted(truth.names)],
                  "annotations": [{"id": n + 1, "image_id": int(i), "category_id": int(c), "iscrowd": 0,
                                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])}
                                  for n, (i, c, b) in enumerate(zip(truth.img, truth.cat, truth.aligned))]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        results = [{"image_id": int(i), "category_id": int(c), "score": float(s),
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
                   for i, c, b, s in zip(dets.img_id, dets.cat_id, dets.bbox, dets.score)]
        run = COCOeval(gt, gt.loadRes(results), "bbox")
        run.params.maxDets = [1, 10, 100000]
        run.evaluate()
        run.accumulate()
        run.summarize()
    precision = run.eval["precision"][:, :, :, 0, -1]
    ap = np.where((precision > -1).any(axis=1), precision.clip(0).mean(axis=1), np.nan)
    return ap, run.stats[1]                     # stats[0] is hard-wired to maxDets=100 (reads -1 here)


@pytest.mark.parametrize("seed,pages,per_page,shift", [(0, 1, 600, 2.0), (1, 3, 200, 1.0), (2, 5, 60, 4.0)])
def test_aligned_coco_map_equals_pycocotools(seed, pages, per_page, shift):
    doc = synthetic_ground_truth(n_images=pages, per_image=per_page, n_classes=6, seed=seed)
    dets = perturbed_detections(doc, seed=seed, shift=shift, drop=0.1, duplicates=0.3, false_positives=0.3,
                                n_classes=9)
    dets = dets[dets.cat_id != 3]                               # a class with ground truth but no detections
    truth = ground_truth(doc)
    report = evaluate(doc, dets, iou=(0.5, 0.75, "coco"), classes=sorted(truth.names))
    theirs, ap50 = _pycocotools_per_class(truth, dets)
    ours = report.per_class
    assert np.array_equal(np.isnan(theirs[0]), np.isnan(ours.ap50.to_numpy()))
    np.testing.assert_allclose(ours.ap50, theirs[0], atol=1e-6)
    np.testing.assert_allclose(ours.ap75, theirs[5], atol=1e-6)
    np.testing.assert_allclose(ours.map_coco, theirs.mean(axis=0), atol=1e-6, equal_nan=True)
    assert report.summary["map50"] == pytest.approx(ap50, abs=1e-6)
    assert report.summary["map_coco"] == pytest.approx(np.nanmean(theirs), abs=1e-6)
    assert ours.set_index("cat_id").loc[3, "ap50"] == 0.0 and math.isnan(ours.set_index("cat_id").loc[8, "ap50"])
    assert len(COCO_IOUS) == 10


def test_sample_page_against_perturbed_copies(sample):
    for seed, shift in [(1, 1.0), (2, 3.0)]:
        noisy = perturbed_detections(sample, seed=seed, shift=shift, drop=0.1, duplicates=0.1, false_positives=0.1)
        result = compare_with_pycocotools(sample, noisy)
        assert result["abs_diff"] < 1e-6 and 0.05 < result["map_ours"] < 0.95
        assert result["ours_s"] > 0 and result["pycocotools_s"] > 0
        strict = evaluate(sample, noisy, iou=(0.5, 0.25, "coco"))
        assert strict.summary["map25"] >= strict.summary["map50"] >= strict.summary["map_coco"]


# --- proposals files and the command line -----------------------------------------------------------------------

def test_proposals_round_trip_and_strings(tmp_path):
    dets = _dets(FOUR, [0.9, 0.8, 0.7, 0.6])
    path = write_proposals(tmp_path / "p.json", dets, annotation_set="deepscores")
    back = load_proposals(path)
    assert back.attrs["annotation_set"] == "deepscores"
    pd.testing.assert_frame_equal(back.drop(columns="bbox"), dets.drop(columns="bbox"), check_dtype=False)
    assert back.bbox.tolist() == [[float(v) for v in b] for b in FOUR]
    # the published detectors wrote numbers as strings
    (tmp_path / "s.json").write_text(json.dumps({"annotation_set": "deepscores", "proposals": [
        {"img_id": 1, "cat_id": NOTEHEAD, "bbox": ["0", "0", "10", "10"], "score": "0.93"}]}))
    assert _ap(_page(FOUR[:1]), load_proposals(tmp_path / "s.json")) == pytest.approx(1.0)


def _write_case(tmp_path, proposals):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(_page(FOUR)))
    props = tmp_path / "props.json"
    props.write_text(json.dumps({"annotation_set": "deepscores", "proposals": proposals}))
    return str(gt), str(props)


def _run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_end_to_end(tmp_path):
    proposals = [{"img_id": 1, "cat_id": NOTEHEAD, "bbox": b, "score": s}
                 for b, s in zip([[0, 0, 10, 10], [25, 0, 35, 10], [60, 0, 70, 10]], [0.9, 0.8, 0.6])]
    gt, props = _write_case(tmp_path, proposals)
    code, out, _ = _run_cli(["evaluate", gt, props, "--iou", "0.5", "0.25", "--json"])
    result = json.loads(out)
    assert code == 0 and result["per_class"][0]["ap25"] == pytest.approx((76 + 0) / 101)
    assert result["summary"]["map50"] == pytest.approx((26 + 25 * 2 / 3) / 101)
    code, out, _ = _run_cli(["evaluate", gt, props, "--toolkit", "--iou", "0.25", "coco"])
    assert code == 0 and "noteheadBlackInSpace" in out and "map_coco" in out and "toolkit" in out


@pytest.mark.slow
def test_pdl_omr_evaluate_command(tmp_path):
    """The installed `pdl` command dispatches `pdl omr evaluate` to cli_main (a subprocess: several seconds)."""
    proposals = [{"img_id": 1, "cat_id": NOTEHEAD, "bbox": b, "score": 0.5} for b in FOUR[:3]]
    gt, props = _write_case(tmp_path, proposals)
    done = subprocess.run([str(Path(sys.executable).parent / "pdl"), "omr", "evaluate", gt, props, "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["n_det"] == 3


@pytest.mark.parametrize("proposals,message", [
    ([{"img_id": 9, "cat_id": NOTEHEAD, "bbox": [0, 0, 1, 1], "score": 1}], "img_id"),
    ([{"img_id": 1, "cat_id": 999, "bbox": [0, 0, 1, 1], "score": 1}], "cat_id"),
    ([{"img_id": 1, "cat_id": NOTEHEAD, "bbox": [0, 0, 1, 1], "score": 1},
      {"img_id": 1, "cat_id": NOTEHEAD, "bbox": [0] * 8, "score": 1}], "all 8"),
    ([{"img_id": 1, "cat_id": NOTEHEAD, "bbox": [0, 0, 1, 1], "score": float("nan")}], "NaN"),
    ([{"img_id": 1, "cat_id": NOTEHEAD, "bbox": [0, 0, 1, 1], "score": "high"}], "NaN"),
    ([{"img_id": 1, "cat_id": NOTEHEAD, "bbox": [0, 0, 1], "score": 1}], "4 numbers"),
    ([{"img_id": 1, "cat_id": NOTEHEAD, "bbox": [0, 0, 1, 1]}], "lacks"),
])
def test_cli_bad_proposals_give_a_clear_error(tmp_path, proposals, message):
    gt, props = _write_case(tmp_path, proposals)
    code, out, err = _run_cli(["evaluate", gt, props])
    assert code == 2 and message in err and "Traceback" not in err and not out


def test_cli_bad_files_and_empty_proposals(tmp_path):
    gt, props = _write_case(tmp_path, [])
    code, out, _ = _run_cli(["evaluate", gt, props, "--json"])                  # empty: AP 0, not an error
    assert code == 0 and json.loads(out)["per_class"][0]["ap50"] == 0.0
    assert _run_cli(["evaluate", gt, str(tmp_path / "missing.json")])[0] == 2
    assert _run_cli(["evaluate", str(tmp_path / "missing.json"), props])[0] == 2
    code, _, err = _run_cli(["evaluate", gt, gt])
    assert code == 2 and "not a proposals file" in err
    (tmp_path / "junk.json").write_text("not json")
    assert "not a JSON file" in _run_cli(["evaluate", gt, str(tmp_path / "junk.json")])[2]
    assert "--iou" in _run_cli(["evaluate", gt, props, "--iou", "half"])[2]
    with pytest.raises(PdlError, match="x1 < x0"):
        evaluate(gt, _dets([[10, 10, 5, 5]], [1.0]))


def test_muscima_annotation_set(sample):
    """The muscima++ ids of the real page (538 of 547 annotations have one) are evaluated like the deepscores ids."""
    muscima = ground_truth(read_deepscores(reference_sample()), "muscima++")
    perfect = perturbed_detections(muscima)
    assert perfect.cat_id.min() > 136 and len(perfect) == 538
    report = evaluate(read_deepscores(reference_sample()), perfect, iou=(0.5, "coco"), annotation_set="muscima++")
    assert report.summary["n_gt"] == 538 and report.summary["map_coco"] == pytest.approx(1.0)
    with pytest.raises(PdlError, match="cat_id"):                      # deepscores ids are not muscima++ ids
        evaluate(muscima, perturbed_detections(sample))
    with pytest.raises(PdlError, match="holds the 'deepscores' set"):
        evaluate(sample, perfect, annotation_set="muscima++")
