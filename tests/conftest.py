"""Shared fixtures: a throw-away pdl project with a tiny chapter notebook."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
PDL = [str(Path(sys.executable).parent / "pdl")]  # the installed console script

TOY_SWEEP = '''
import json, os, time
from pathlib import Path
import pdl.runs
from pdl.core import atomic_write_text
run = pdl.runs.start("01_toy", globals(), PROFILES)
log = Path(os.environ.get("TOY_LOG", os.devnull))
for i in range(items):
    done = run.work_dir / f"item{i}.json"
    if done.exists():
        continue
    with open(log, "a") as f: f.write(f"{i}\\n")
    time.sleep(delay)
    atomic_write_text(done, json.dumps({"i": i, "square": i * i}))
values = [json.loads((run.work_dir / f"item{i}.json").read_text())["square"] for i in range(items)]
run.save_metrics({"total": sum(values), "epochs": epochs})
'''

TOY_FIGURE = '''
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(4, 4))
ax.add_patch(plt.Rectangle((0, 0), 1, 1, color=(1.0, 0.0, 0.0)))
ax.set_axis_off()
run.save_figure("red_square", fig)
plt.show()
'''


def make_toy_notebook(path: Path) -> Path:
    """A chapter notebook with parameters, profiles and a resumable sweep over `items`."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(
        'profile = "smoke"  # smoke | cpu\nepochs = 1  # training epochs\nlr = 0.1  # learning rate\n'
        'items = 3  # sweep length\ndelay = 0.0  # seconds per item\nname = "toy"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# A toy chapter\n\nIt sums squares."),
                params,
                nbformat.v4.new_code_cell('PROFILES = {"smoke": {}, "cpu": {"epochs": 2, "items": 4}}'),
                nbformat.v4.new_code_cell(TOY_SWEEP),
                nbformat.v4.new_code_cell("#| hide\nassert run.load_metrics()['total'] >= 0"),
                nbformat.v4.new_code_cell("print('total', run.load_metrics()['total'])"),
                nbformat.v4.new_code_cell(TOY_FIGURE)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def toy_project(tmp_path, monkeypatch):
    """A pdl project root in tmp_path with `notebooks/01_toy.ipynb`; PDL_ROOT points at it."""
    (tmp_path / "settings.ini").write_text("[DEFAULT]\nlib_name = pdl\n")
    (tmp_path / "notebooks").mkdir()
    make_toy_notebook(tmp_path / "notebooks" / "01_toy.ipynb")
    monkeypatch.setenv("PDL_ROOT", str(tmp_path))
    monkeypatch.setenv("PDL_PROGRESS", "0")
    for var in ("PDL_RUNS_DIR", "PDL_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


TOY_LIBRARY = [
    "# Toy library\n\n> A library page for the tiny book.",
    "#| default_exp core",
    "#| export\ndef double(x: int) -> int:\n    \"\"\"Twice `x`.\"\"\"\n    return 2 * x",
    "A visible example:",
    "double(21)",
    "#| hide\nassert double(2) == 4",
]


def make_toy_library(path: Path) -> Path:
    """A library notebook exporting (pretend) `pdl.core`: prose, an exported function, an example, a hidden test."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(t) if i in (0, 3) else nbformat.v4.new_code_cell(t)
                for i, t in enumerate(TOY_LIBRARY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="session")
def executed_toy_book(tmp_path_factory):
    """A tiny book project whose chapter (smoke) and library page were executed once for the whole session."""
    root = tmp_path_factory.mktemp("toy_book")
    (root / "settings.ini").write_text("[DEFAULT]\nlib_name = pdl\n")
    (root / "notebooks").mkdir()
    make_toy_notebook(root / "notebooks" / "01_toy.ipynb")
    make_toy_library(root / "notebooks" / "lib" / "00_toy.ipynb")
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    (root / "book").mkdir()
    (root / "book" / "intro.md").write_text("# Intro\n\nA tiny book.\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nparts:\n"
                                   "  - caption: Chapters\n    chapters:\n      - file: book/chapters/01_toy\n"
                                   "  - caption: Library\n    chapters:\n      - file: book/lib/00_toy\n")
    env = {"PDL_ROOT": str(root), "PDL_PROGRESS": "0", "PDL_RUNS_DIR": "", "PDL_CACHE_DIR": ""}
    result = pdl_cli("run", "01_toy", env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def book_project(executed_toy_book, tmp_path, monkeypatch):
    """A private copy of the executed tiny book project (its run is stored: no chapter executes again)."""
    root = tmp_path / "book_project"
    shutil.copytree(executed_toy_book, root)
    monkeypatch.setenv("PDL_ROOT", str(root))
    monkeypatch.setenv("PDL_PROGRESS", "0")
    for var in ("PDL_RUNS_DIR", "PDL_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    return root


def pdl_cli(*args, env=None, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """Run the `pdl` command in a subprocess."""
    return subprocess.run(PDL + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kwargs)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks: one torch thread (several contend on a shared machine); the count is restored afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
