"""pdl.music (msmd, audio): the synthetic MSMD generates offline, the same seed gives the same labels, labels agree
with the audio, bad pieces are skipped with their reasons, and missing tools or SoundFonts give clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pdl.core import PdlError
from pdl.music import audio as A
from pdl.music import msmd as M

CHORALES = [M.Source("bach/bwv66.6.mxl", "reduction"), M.Source("bach/bwv1.6.mxl", "reduction")]
FAST_FONTS = {split: "FluidR3_GM" for split in M.SPLITS}      # the .sf3 test piano loads slowly: not needed here


def _generate(out: Path, seed: int = 3):
    return M.generate(out, pieces=2, seed=seed, tempi=(1.0, 1.25), soundfonts=FAST_FONTS, max_pages=1,
                      sources=CHORALES, show_progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("msmd") / "a"
    report = _generate(out)
    assert not report.failed, report.failed
    return out


def _labels(root: Path) -> dict:
    return {p.key: {k: p.meta[k] for k in ("notes", "systems", "pages", "split")} for p in M.MSMD(root).pieces}


def test_same_seed_same_labels(dataset, tmp_path):
    again = M.generate(tmp_path / "b", pieces=1, seed=3, tempi=(1.0, 1.25), soundfonts=FAST_FONTS, max_pages=1,
                       sources=CHORALES, show_progress=False)         # the first piece of the same plan
    assert again.made == 1
    first_key = M.MSMD(tmp_path / "b").pieces[0].key
    assert _labels(dataset)[first_key] == _labels(tmp_path / "b")[first_key]
    first, second = M.MSMD(dataset).pieces[0], M.MSMD(tmp_path / "b").pieces[0]
    assert np.array_equal(first.page_image(0), second.page_image(0))
    assert np.allclose(first.spectrogram(1.0), second.spectrogram(1.0), atol=1e-4)
    other = M.plan_sources(M.piano_sources(), seed=1)[:5]
    assert other != M.plan_sources(M.piano_sources(), seed=0)[:5]          # another seed, another plan


def test_labels_agree_with_the_audio(dataset):
    ds = M.MSMD(dataset)
    assert len(ds) == 2 and {p.split for p in ds.pieces} == {"train", "test"}
    for piece in ds.pieces:
        record = json.loads((dataset / "work" / "pieces" / f"{piece.key}.json").read_text())
        assert record["midi_mismatches"] == 0
        np.testing.assert_allclose(piece.onsets(1.25), piece.notes["onset"] / 1.25)
        for tempo in piece.tempi:
            spec = piece.spectrogram(tempo)
            events, targets = piece.events(tempo, 0), piece.frame_targets(tempo, 0)
            assert len(events) > 10 and targets.onset.sum() == len(events)
            assert (events.w == M.BOX_WIDTH).all() and (np.diff(events.frame) > 0).all()
            assert targets.frames[0] == events.frame[0] and targets.frames[-1] < len(spec)
            systems = piece.page_systems(0)
            assert np.allclose(targets.boxes[:, 1], systems[targets.system, 1:4:2].mean(1))
            flux = np.r_[0, np.clip(np.diff(spec, axis=0), 0, None).sum(1)]   # energy rise per frame
            at_onsets = flux[events.frame].mean()
            elsewhere = np.delete(flux, np.r_[events.frame, events.frame + 1]).mean()
            assert at_onsets > 2 * elsewhere, (piece.key, tempo, at_onsets, elsewhere)
        longer = piece.meta["performances"]
        assert longer[0]["seconds"] > longer[1]["seconds"]                 # tempo 1.25 is faster
    table = M.onset_table(ds)
    assert set(table["tempo"]) == {1.0, 1.25} and len(table) == sum(len(p.events(t, pg)) for p, t, pg in ds.items())


def test_resume_and_settings(dataset):
    report = _generate(dataset)
    assert (report.made, report.reused) == (0, 2)
    with pytest.raises(PdlError, match="other settings"):
        M.generate(dataset, pieces=2, seed=3, tempi=(1.0,), soundfonts=FAST_FONTS, max_pages=1, sources=CHORALES,
                   show_progress=False)


SKIP_SCENARIO = """
import json, multiprocessing, os, shutil, sys
from pathlib import Path
from pdl.music import msmd as M
from pdl.omr import corpus as C, engrave as E
corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
(corpus / "mine").mkdir(parents=True)
(corpus / "mine" / "garbage.xml").write_text("<score-partwise><this is not music")
rest = '<note><rest/><duration>4</duration><staff>{}</staff></note>'
(corpus / "mine" / "silent.xml").write_text(
    '<?xml version="1.0"?><score-partwise version="3.1"><part-list><score-part id="P1"><part-name>Piano</part-name>'
    '</score-part></part-list><part id="P1"><measure number="1"><attributes><divisions>1</divisions><staves>2</staves>'
    '<clef number="1"><sign>G</sign><line>2</line></clef><clef number="2"><sign>F</sign><line>4</line></clef>'
    '</attributes>' + rest.format(1) + '<backup><duration>4</duration></backup>' + rest.format(2) +
    '</measure></part></score-partwise>')
for name in ("good", "segfault"):
    shutil.copy(C.corpus_root() / "bach" / "bwv66.6.mxl", corpus / "mine" / f"{name}.mxl")
sources = [M.Source("mine/garbage.xml", "keyboard"), M.Source("mine/silent.xml", "keyboard"),
           M.Source("mine/segfault.mxl", "reduction"), M.Source("mine/good.mxl", "reduction")]
real = M.make_piece
def crashing(task, out, root):  # verovio can die of a signal: simulate it in the worker
    if "segfault" in task.path:
        os.kill(os.getpid(), 11)
    return real(task, out, root)
M.make_piece = crashing
E.worker_context = lambda: multiprocessing.get_context("fork")  # so the patched function reaches the workers
fonts = {s: "FluidR3_GM" for s in M.SPLITS}
report = M.generate(out, pieces=4, tempi=(1.0,), soundfonts=fonts, max_pages=1, sources=sources, corpus=corpus,
                    show_progress=False)
print(json.dumps(dict(counts=report.counts, failed=dict(report.failed))))
"""


def test_bad_pieces_are_skipped_with_their_reasons(tmp_path):
    # a clean interpreter: forking this test process (which may run threads by now) could deadlock
    result = subprocess.run([sys.executable, "-c", SKIP_SCENARIO, str(tmp_path / "corpus"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PDL_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sum(c["pieces"] for c in report["counts"].values()) == 1
    assert "verovio cannot engrave" in report["failed"]["mine/garbage.xml"]
    assert "has no notes" in report["failed"]["mine/silent.xml"]
    assert "crashed (signal 11)" in report["failed"]["mine/segfault.mxl"]
    card = (tmp_path / "out" / "data_card.md").read_text()
    assert "mine/silent.xml" in card and "Skipped pieces: 3" in card


def test_missing_soundfont_and_empty_midi(tmp_path, monkeypatch):
    with pytest.raises(PdlError, match="not found"):
        M.generate(tmp_path / "x", soundfonts={"test": str(tmp_path / "piano.sf2")}, show_progress=False)
    assert not (tmp_path / "x").exists()                                  # refused before any work
    monkeypatch.setitem(A.SOUNDFONTS, "MuseScore_General", (str(tmp_path / "gone.sf3"), "musescore-general-soundfont"))
    with pytest.raises(PdlError, match="apt-get install musescore-general-soundfont"):
        M.generate(tmp_path / "y", show_progress=False)
    assert M.cli_main(["generate", "--out", str(tmp_path / "z"), "--test-soundfont", str(tmp_path / "no.sf3")]) == 2
    empty = A.midi_bytes(np.zeros((0, 4)))
    assert A.read_midi_notes(empty).shape == (0, 4)
    with pytest.raises(PdlError, match="no notes"):
        M.render_performances(A.read_midi_notes(empty), (1.0,), "FluidR3_GM")
    monkeypatch.setattr(A.shutil, "which", lambda name: None)
    (tmp_path / "a.mid").write_bytes(A.midi_bytes(np.array([[0.0, 0.5, 60, 80]])))
    with pytest.raises(PdlError, match="fluidsynth program is not installed"):
        A.render_midi(tmp_path / "a.mid", "FluidR3_GM")


def test_room_impulse_responses(tmp_path, monkeypatch):
    monkeypatch.setenv("PDL_CACHE_DIR", str(tmp_path))
    bank = A.ir_bank(n=2, seed=5)
    assert len(bank) == 2 and all(ir.dtype == np.float32 and np.abs(ir).max() == 1 for ir in bank)
    assert all(np.array_equal(a, b) for a, b in zip(bank, A.make_ir_bank(2, seed=5)))
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 0.1
    wet = A.convolve_ir(x, bank[0])
    assert wet.shape == x.shape and np.isclose(np.abs(wet).max(), np.abs(x).max())


def _offline_prefix() -> list[str]:
    for prefix in (["unshare", "-n"], ["unshare", "-r", "-n"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except FileNotFoundError:
            break
    pytest.skip("cannot run a child without network here (unshare)")


@pytest.mark.slow
def test_cli_generates_five_pieces_offline(tmp_path):
    pdl = str(Path(sys.executable).parent / "pdl")
    out = tmp_path / "msmd"
    result = subprocess.run([*_offline_prefix(), pdl, "msmd", "generate", "--out", str(out), "--pieces", "5"],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "PDL_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    ds = M.MSMD(out)
    assert len(ds) == 5 and {p.split for p in ds.pieces} == {"train", "valid", "test"}
    assert all(p.tempi == (0.8, 1.0, 1.2) for p in ds.pieces)
    test = M.MSMD(out, "test").pieces[0]
    assert test.soundfont == "MuseScore_General" and test.audio(1.2).dtype == np.float32
    assert subprocess.run([pdl, "msmd", "info", str(out)], capture_output=True, text=True).stdout.count("|") > 20
