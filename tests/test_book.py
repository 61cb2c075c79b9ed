"""A tiny book build: one executed chapter and one library page rendered by Jupyter Book with no Sphinx warnings."""
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import pdl_cli


@pytest.fixture(scope="module")
def built_book(executed_toy_book, tmp_path_factory):
    """The tiny book built once (strict: any Sphinx warning fails) from a copy of the executed toy project."""
    root = tmp_path_factory.mktemp("built") / "project"
    shutil.copytree(executed_toy_book, root)
    result = pdl_cli("book", "--profile", "smoke", "--strict", cwd=root,
                     env={"PDL_ROOT": str(root), "PDL_PROGRESS": "0", "PDL_RUNS_DIR": "", "PDL_CACHE_DIR": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING pdl.book" not in result.stderr  # Sphinx warnings are re-logged by pdl.book
    return root


def test_chapter_page_has_provenance_and_no_tests(built_book):
    html = built_book / "_build" / "html"
    page = (html / "book" / "chapters" / "01_toy.html").read_text()
    assert "Results of a" in page and "smoke" in page and "total" in page
    assert "#| hide" not in page and "assert run.load_metrics" not in page  # inline tests removed
    assert (html / "index.html").exists()
    chapter = json.loads((built_book / "book" / "chapters" / "01_toy.ipynb").read_text())
    assert any("remove-cell" in c["metadata"].get("tags", []) for c in chapter["cells"])


def test_library_page_shows_code_and_examples_and_chapters_link_to_it(built_book):
    html = built_book / "_build" / "html"
    page = (html / "book" / "lib" / "00_toy.html").read_text()
    assert "def" in page and "double" in page and "42" in page        # the code and the executed example
    assert "assert double(2)" not in page and "default_exp" not in page  # tests and directives removed
    chapter = (html / "book" / "chapters" / "01_toy.html").read_text()
    assert 'href="../lib/00_toy.html"' in chapter                      # the chapter imports pdl.core


def test_committed_larger_run_is_preferred(book_project):
    assert pdl_cli("run", "01_toy", "--profile", "cpu").returncode == 0
    run_id = next(p.name for p in (book_project / "runs" / "01_toy").iterdir() if p.name.startswith("cpu-"))
    published = pdl_cli("runs", "publish", run_id)
    assert published.returncode == 0, published.stderr
    assert (book_project / "book" / "results" / "01_toy" / "cpu" / "run.json").exists()
    from pdl.book import committed_run
    assert committed_run("01_toy", "smoke", book_project).profile == "cpu"
    assert committed_run("01_toy", "gpu", book_project) is None


def test_figures_are_visible_in_a_headless_browser(built_book, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (make setup installs it)")
    page = built_book / "_build" / "html" / "book" / "chapters" / "01_toy.html"
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red.sum() > 5000, "the red square figure is not visible on the rendered page"


@pytest.mark.slow
def test_chapters_run_side_by_side_when_jobs_allow(book_project):
    """`pdl book --jobs 2` executes uncached chapters in parallel child processes and still renders them."""
    shutil.copy(book_project / "notebooks" / "01_toy.ipynb", book_project / "notebooks" / "02_toy.ipynb")
    toc = (book_project / "_toc.yml").read_text()
    (book_project / "_toc.yml").write_text(toc.replace("      - file: book/chapters/01_toy\n",
                                                       "      - file: book/chapters/01_toy\n      - file: book/chapters/02_toy\n"))
    shutil.rmtree(book_project / "runs" / "01_toy")
    result = pdl_cli("book", "--profile", "smoke", "--jobs", "2", cwd=book_project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 at a time" in result.stderr
    for chapter in ("01_toy", "02_toy"):
        assert (book_project / "_build" / "html" / "book" / "chapters" / f"{chapter}.html").exists()


def test_toc_lists_every_chapter_and_public_library_notebook():
    """The book's table of contents names every chapter and every library notebook except private modules."""
    from conftest import REPO
    from pdl.book import library_notebooks, library_page, toc_chapters, toc_library
    from pdl.runs import chapters
    public = [library_page(p) for m, p in library_notebooks(REPO).items() if not m.split(".")[-1].startswith("_")]
    assert sorted(toc_library(REPO)) == sorted(public)
    assert sorted(toc_chapters(REPO)) == sorted(chapters())
