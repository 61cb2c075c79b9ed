"""A tiny book build: one executed chapter rendered by Jupyter Book with no Sphinx warnings."""
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, pdl_cli


def test_tiny_book_builds_without_warnings(toy_project):
    shutil.copy(REPO / "_config.yml", toy_project / "_config.yml")
    (toy_project / "book").mkdir()
    (toy_project / "book" / "intro.md").write_text("# Intro\n\nA tiny book.\n")
    (toy_project / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n  - file: book/chapters/01_toy\n")
    result = pdl_cli("book", "--profile", "smoke", "--strict", cwd=toy_project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING pdl.book" not in result.stderr  # Sphinx warnings are re-logged by pdl.book
    html = toy_project / "_build" / "html"
    page = (html / "book" / "chapters" / "01_toy.html").read_text()
    assert "Results of a" in page and "smoke" in page and "total" in page
    assert "#| hide" not in page and "assert run.load_metrics" not in page  # inline tests removed
    assert (html / "index.html").exists()
    chapter = json.loads((toy_project / "book" / "chapters" / "01_toy.ipynb").read_text())
    assert any("remove-cell" in c["metadata"].get("tags", []) for c in chapter["cells"])


def test_committed_larger_run_is_preferred(toy_project):
    assert pdl_cli("run", "01_toy", "--profile", "cpu").returncode == 0
    run_id = next((toy_project / "runs" / "01_toy").iterdir()).name
    published = pdl_cli("runs", "publish", run_id)
    assert published.returncode == 0, published.stderr
    assert (toy_project / "book" / "results" / "01_toy" / "cpu" / "run.json").exists()
    from pdl.book import committed_run
    assert committed_run("01_toy", "smoke", toy_project).profile == "cpu"
    assert committed_run("01_toy", "gpu", toy_project) is None


def test_figures_are_visible_in_a_headless_browser(toy_project, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (make setup installs it)")
    shutil.copy(REPO / "_config.yml", toy_project / "_config.yml")
    (toy_project / "book").mkdir()
    (toy_project / "book" / "intro.md").write_text("# Intro\n")
    (toy_project / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/chapters/01_toy\n")
    assert pdl_cli("book", "--profile", "smoke", cwd=toy_project).returncode == 0
    page = toy_project / "_build" / "html" / "book" / "chapters" / "01_toy.html"
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red.sum() > 5000, "the red square figure is not visible on the rendered page"
