"""Every shell command that README.md, CONTRIBUTING.md and the book's intro show is executed here, as printed.

Commands run in a copy of the project (so nothing they write lands in the checkout), with the data packages and
caches of the checkout. Where a command runs a chapter at a larger profile it runs at `smoke`; a generation of
many pages or pieces makes two; `<run-id>` stands for the run made by the command before. Three commands cannot run inside
the test suite and are checked with `make -n` instead (the target exists and does what the docs say): `make test`
and `make test-fast` (CI runs the first, and this file is part of both) and `make book` (about half an hour;
`tests/test_book.py` builds a tiny book through the same `pdl book`)."""
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

DOCS = ("README.md", "CONTRIBUTING.md", "book/intro.md")
DRY_RUN = {"make book", "make test", "make test-fast"}      # see the module docstring
COPIED = ("settings.ini", "_config.yml", "_toc.yml", "Makefile", "pyproject.toml", "notebooks", "pdl", "book",
          "tools", "requirements")


def shell_commands(markdown: str) -> list[str]:
    """The commands of the ```bash blocks of a Markdown text, comments removed, `&&` chains kept whole."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def documented_commands() -> list[tuple[str, str]]:
    return [(doc, c) for doc in DOCS for c in shell_commands((REPO / doc).read_text())]


def test_the_docs_show_commands():
    commands = [c for _, c in documented_commands()]
    assert "make book" in commands and "make test" in commands
    assert len(commands) >= 15


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project sharing the checkout's virtual environment, data packages and caches."""
    root = tmp_path_factory.mktemp("docs") / "pdl"
    root.mkdir()
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "chapters", "results"))
        else:
            shutil.copy(src, root / name)
    (root / ".venv").symlink_to(REPO / ".venv")
    (root / ".pdl").symlink_to(REPO / ".pdl")                    # data packages fetched by the checkout's set-up
    (root / "my_params.yaml").write_text("seed: 1\n")          # the README's example parameter file
    return root


def adapted(command: str, state: dict) -> str:
    """The command as the test runs it (see the module docstring)."""
    command = re.sub(r"--profile (cpu|gpu)", "--profile smoke", command)
    command = re.sub(r"--pages \d+", "--pages 2", command)
    command = re.sub(r"--pieces \d+", "--pieces 2", command)
    return command.replace("<run-id>", state.get("run_id", "<run-id>"))


def run_documented(command: str, root: Path, state: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PDL_PROGRESS": "0", "PDL_VENDOR_DIR": str(REPO / ".pdl" / "vendor"),
           "PDL_CACHE_DIR": str(REPO / ".pdl" / "cache"), "PDL_ROOT": "", "PDL_RUNS_DIR": ""}
    if command in DRY_RUN:
        return subprocess.run(["make", "-n", *command.split()[1:]], cwd=root, capture_output=True, text=True, env=env)
    if command == "make lab":          # a server: it must start and serve, then it is stopped
        return _serve_briefly(command, root, env)
    result = subprocess.run(adapted(command, state), shell=True, cwd=root, capture_output=True, text=True, env=env,
                            timeout=900)
    if m := re.search(r"^(?:done|cached): \S+ (\S+) ->", result.stdout, re.M):
        state["run_id"] = m.group(1)
    return result


def _serve_briefly(command: str, root: Path, env: dict) -> subprocess.CompletedProcess:
    env = {**env, "LAB_ARGS": "--no-browser --port 0 --IdentityProvider.token="}
    proc = subprocess.Popen(command, shell=True, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    output, deadline = [], time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        output.append(line)
        if "is running at" in line or proc.poll() is not None:
            break
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    output.append(proc.stdout.read() if proc.poll() is not None and proc.stdout else "")
    ok = any("running at" in line for line in output)
    return subprocess.CompletedProcess(command, 0 if ok else 1, "".join(output), "")


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_works_as_printed(doc, project):
    state: dict = {}
    failures = []
    for command in shell_commands((REPO / doc).read_text()):
        result = run_documented(command, project, state)
        if result.returncode != 0:
            failures.append(f"{command!r} (run as {adapted(command, state)!r}) exited {result.returncode}:\n"
                            f"{(result.stdout + result.stderr)[-1500:]}")
    assert not failures, "\n\n".join(failures)
