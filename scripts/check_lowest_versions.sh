#!/usr/bin/env bash
# The lowest versions pyproject.toml allows, checked: every runtime dependency pinned to its floor (">=X" becomes
# "==X") in a throwaway venv outside the repository, then the tests that exercise the dependencies' APIs (loading,
# LoRA and its diffusers export, the latent diffusion module, the text cache, fidelity). A floor stays in
# pyproject.toml only if this passes on it (docs/configuration.md, "Dependency floors").
#
#   scripts/check_lowest_versions.sh                      # a new temporary venv, the core tests
#   scripts/check_lowest_versions.sh tests/test_ema.py    # other pytest arguments instead of the core tests
#   LOWEST_VERSIONS_DIR=/tmp/lowest scripts/...           # keep (and reuse) the venv and the copy there
#   TORCH_SPEC=torch==2.13.0 scripts/...                  # another torch than the floor (say, a local CPU wheel)
#   scripts/check_lowest_versions.sh --pins               # only print the pins (name==floor), install nothing
#
# Needs Python >= 3.11 (tomllib) and the package index; PyPI's Linux torch wheels bring CUDA libraries (~3 GB).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
workdir=${LOWEST_VERSIONS_DIR:-$(mktemp -d -t lowest-versions.XXXXXX)}
venv=$workdir/venv
source_copy=$workdir/src
core_tests=(
  tests/test_loading.py tests/test_adapters.py tests/test_objective_reach.py tests/test_latent_diffusion.py
  tests/test_text_cache.py tests/test_fidelity.py
)

floors=$(python3 - "$repo/pyproject.toml" <<'PY'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    requirements = tomllib.load(file)["project"]["dependencies"]
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][^,;\s]*)", requirement)
    if match is None:
        sys.exit(f"pyproject.toml: dependency '{requirement}' is not of the form 'name>=floor'")
    print(f"{match[1]}=={match[2]}")
PY
)
if [ "${1:-}" = "--pins" ]; then
  echo "$floors"
  exit 0
fi
torch_pin=$(grep '^torch==' <<<"$floors")
other_pins=$(grep -v '^torch==' <<<"$floors")

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# torch first, so that nothing else chooses it; then every other floor exactly.
"$venv/bin/pip" install --quiet "${TORCH_SPEC:-$torch_pin}"
torch_installed=$("$venv/bin/python" -c "import torch; print(torch.__version__)")

# A copy of the working tree (tracked and untracked files git does not ignore): the run writes nothing in the repo.
rm -rf "$source_copy" && mkdir -p "$source_copy"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar --ignore-failed-read -cf - 2>/dev/null) |
  tar -xf - -C "$source_copy"

# shellcheck disable=SC2086
"$venv/bin/pip" install --quiet -e "$source_copy" $other_pins "pytest>=8"
if [ "$("$venv/bin/python" -c "import torch; print(torch.__version__)")" != "$torch_installed" ]; then
  echo "a dependency replaced torch $torch_installed: its floor is not installable beside that torch" >&2
  exit 1
fi
"$venv/bin/pip" check

echo "== installed at their floors:"
"$venv/bin/pip" list --format=freeze | grep -iE "^($(sed 's/==.*//' <<<"$floors" | paste -sd'|'))=="
cd "$source_copy"
if [ "$#" -eq 0 ]; then
  set -- "${core_tests[@]}"
fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
