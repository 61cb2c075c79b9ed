"""The runner and run store through the `pdl` command: parameters, caching, interruption, listing."""
import json
import os
import signal
import subprocess
import time

import nbformat
import pytest

from conftest import PDL, REPO, pdl_cli


def test_unknown_parameter_fails_fast_naming_valid_ones(toy_project):
    started = time.perf_counter()
    result = pdl_cli("run", "01_toy", "-p", "no_such_parameter=1")
    assert result.returncode == 2
    assert "unknown parameter 'no_such_parameter'" in result.stderr
    assert "epochs: int = 1  # training epochs" in result.stderr and "lr: float = 0.1" in result.stderr
    assert time.perf_counter() - started < 10
    assert not (toy_project / "runs").exists() or not any((toy_project / "runs").rglob("params.json"))


@pytest.mark.parametrize("args, message", [
    (["-p", "epochs=many"], "epochs expects int"),
    (["-p", "lr=fast"], "lr expects float"),
    (["-p", "epochs"], "expected key=value"),
    (["--profile", "huge"], "unknown profile 'huge'"),
])
def test_ill_typed_parameters_are_rejected(toy_project, args, message):
    result = pdl_cli("run", "01_toy", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_real_chapter_rejects_unknown_parameter_before_executing():
    if not (REPO / "notebooks" / "01_data.ipynb").exists():
        pytest.skip("01_data notebook not present")
    started = time.perf_counter()
    result = pdl_cli("run", "01_data", "-p", "no_such_parameter=1", cwd=REPO)
    assert result.returncode == 2 and "valid parameters" in result.stderr and "profile: str" in result.stderr
    assert time.perf_counter() - started < 10


def test_run_then_cached(toy_project, tmp_path):
    log = tmp_path / "log.txt"
    first = pdl_cli("run", "01_toy", "--profile", "cpu", "-p", "lr=0.5", env={"TOY_LOG": str(log)})
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("done:")
    run_dir = next((toy_project / "runs" / "01_toy").iterdir())
    assert run_dir.name.startswith("cpu-")
    params = json.loads((run_dir / "params.json").read_text())
    assert params == {"profile": "cpu", "epochs": 2, "lr": 0.5, "items": 4, "delay": 0.0, "name": "toy"}
    assert json.loads((run_dir / "metrics.json").read_text()) == {"total": 0 + 1 + 4 + 9, "epochs": 2}
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["packages"]["torch"] and env["device"] and "git" in env
    assert (run_dir / "notebook.ipynb").exists() and (run_dir / "run.json").exists()
    assert log.read_text().split() == ["0", "1", "2", "3"]

    again = pdl_cli("run", "01_toy", "--profile", "cpu", "-p", "lr=0.5", env={"TOY_LOG": str(log)})
    assert again.returncode == 0 and again.stdout.startswith("cached:")
    assert log.read_text().split() == ["0", "1", "2", "3"]  # nothing recomputed

    listing = pdl_cli("runs", "list")
    assert run_dir.name in listing.stdout
    shown = json.loads(pdl_cli("runs", "show", run_dir.name).stdout)
    assert shown["metrics"]["total"] == 14 and shown["params"]["lr"] == 0.5

    other = pdl_cli("run", "01_toy", "--profile", "cpu", "-p", "lr=0.25", env={"TOY_LOG": str(log)})
    assert other.stdout.startswith("done:")  # different parameters, different run


def test_params_file(toy_project, tmp_path):
    (tmp_path / "p.yaml").write_text("items: 2\nname: other\n")
    result = pdl_cli("run", "01_toy", "-f", str(tmp_path / "p.yaml"), "-p", "items=5")
    assert result.returncode == 0, result.stderr
    run_dir = next((toy_project / "runs" / "01_toy").iterdir())
    assert json.loads((run_dir / "params.json").read_text())["items"] == 5  # command line wins over the file
    assert json.loads((run_dir / "params.json").read_text())["name"] == "other"
    (tmp_path / "bad.yaml").write_text("- a list\n")
    assert "must hold a mapping" in pdl_cli("run", "01_toy", "-f", str(tmp_path / "bad.yaml")).stderr


@pytest.mark.slow
def test_interrupted_run_resumes_without_recomputing(toy_project, tmp_path):
    log = tmp_path / "log.txt"
    args = ["run", "01_toy", "-p", "items=6", "-p", "delay=0.6"]
    proc = subprocess.Popen(PDL + args, env={**os.environ, "TOY_LOG": str(log)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().split()) < 3):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = next((toy_project / "runs" / "01_toy").iterdir())
    assert not (run_dir / "run.json").exists() and not (run_dir / "notebook.ipynb").exists()
    finished = sorted(p.name for p in (run_dir / "work").glob("item*.json"))
    assert 2 <= len(finished) < 6
    assert not list((run_dir / "work").glob(".*tmp"))  # nothing half-written

    result = pdl_cli(*args, env={"TOY_LOG": str(log)})
    assert result.returncode == 0, result.stderr
    computed = log.read_text().split()
    assert sorted(set(computed)) == [str(i) for i in range(6)]
    # finished items were not computed again; at most the one in flight at the kill is repeated
    assert len(computed) - 6 <= 1
    assert json.loads((run_dir / "metrics.json").read_text())["total"] == sum(i * i for i in range(6))


@pytest.mark.slow
def test_failing_notebook_keeps_its_state_and_says_where(toy_project):
    result = pdl_cli("run", "01_toy", "-p", "items=-1")  # range(-1) is empty: fine; break it another way
    assert result.returncode == 0
    nb = toy_project / "notebooks" / "01_toy.ipynb"
    nb.write_text(nb.read_text().replace("print('total'", "raise ValueError('boom'); print('total'"))
    result = pdl_cli("run", "01_toy")
    assert result.returncode == 2 and "01_toy failed" in result.stderr and "boom" in result.stderr
    assert "notebook.failed.ipynb" in result.stderr and "kept" in result.stderr


def test_unknown_chapter_lists_chapters(toy_project):
    result = pdl_cli("run", "99_nothing")
    assert result.returncode == 2 and "01_toy" in result.stderr


# --- run ids follow every import form into subpackages ---------------------------------------------------------

FAKE_PACKAGE = {
    "__init__.py": "",
    "core.py": "X = 1\n",
    "runs.py": "from .core import X\n",
    "train.py": "from pdl.core import X\n",
    "unrelated.py": "Y = 2\n",
    "omr/__init__.py": "",
    "omr/render.py": "from ..train import fit\nfrom .boxes import iou\n",
    "omr/boxes.py": "def iou(): pass\n",
    "omr/patches.py": "from . import render\n",
    "omr/engrave.py": "E = 3\n",
    "models/__init__.py": "",
    "models/core.py": "M = 1\n",
    "models/anynet.py": "from .core import M\n",
}

CHAPTER_SOURCES = {
    "from_submodule": "from pdl.omr.render import fit",
    "import_dotted": "import pdl.omr.render as r",
    "from_package_import_module": "from pdl.omr import render",
    "loader_string": 'register("patches", "pdl.omr.render:load_patches")',
}


def _fake_project(tmp_path, source):
    package = tmp_path / "pdl"
    for rel, text in FAKE_PACKAGE.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, tmp_path / "99_chapter.ipynb")
    return package, tmp_path / "99_chapter.ipynb"


@pytest.mark.parametrize("form", sorted(CHAPTER_SOURCES))
@pytest.mark.parametrize("edited, changes", [
    ("omr/render.py", True),        # the module the chapter imports
    ("omr/boxes.py", True),         # imported by it, relatively (`from .boxes import`)
    ("train.py", True),             # two levels up (`from ..train import`)
    ("core.py", True),              # always part of a run
    ("omr/__init__.py", True),      # Python runs it on the way to omr.render
    ("omr/engrave.py", False),      # same subpackage, not used
    ("unrelated.py", False),
    ("models/anynet.py", False),
])
def test_run_id_follows_imports_into_subpackages(tmp_path, form, edited, changes):
    from pdl.runs import _code_digest
    package, nb = _fake_project(tmp_path, CHAPTER_SOURCES[form])
    before = _code_digest(nb, package)
    (package / edited).write_text((package / edited).read_text() + "\n# edited\n")
    assert (_code_digest(nb, package) != before) == changes


def test_importing_a_whole_package_depends_on_all_of_it(tmp_path):
    from pdl.runs import _code_digest
    package, nb = _fake_project(tmp_path, "from pdl import omr")
    before = _code_digest(nb, package)
    (package / "omr/engrave.py").write_text("E = 4\n")
    assert _code_digest(nb, package) != before


def test_chapter_prefixes_resolve_to_chapters_not_library_notebooks(toy_project):
    lib = toy_project / "notebooks" / "lib"
    lib.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("#| default_exp core")]
    nbformat.write(nb, lib / "01_core.ipynb")
    nbformat.write(nb, toy_project / "notebooks" / "01a_helpers.ipynb")   # no parameters cell: not a chapter
    from pdl.runs import chapters, notebook_path
    assert chapters() == ["01_toy"]
    assert notebook_path("01").name == notebook_path("1").name == "01_toy.ipynb"


def test_tools_answer_help_and_unknown_commands_are_named():
    """`pdl <tool> --help` reaches the tool's own parser; an unknown command lists the valid ones."""
    from pdl.cli import main
    with pytest.raises(SystemExit) as done:
        main(["deepscores", "--help"])
    assert done.value.code == 0
    with pytest.raises(SystemExit) as done:
        main(["no_such_command"])
    assert done.value.code == 2
