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


def pdl_cli(*args, env=None, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """Run the `pdl` command in a subprocess."""
    return subprocess.run(PDL + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kwargs)
