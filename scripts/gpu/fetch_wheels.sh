#!/usr/bin/env bash
# Downloads into ./.whl (run from the project's root, with package-registry access) the wheels a
# GPU machine without internet may lack for loramux: scripts/gpu/wheels.txt, versions as this
# project's suite runs them. The first H200 (2026-12: Python 3.12, torch 2.11.0+cu130,
# transformers 5.17, hub 1.33) lacked all of these or had them too old; torch and Triton were
# there and are not carried; what else the machines' image holds is in image-packages.txt (the
# suite checks that the two cover what loramux[server] needs). .whl is git-ignored; carry it to
# the machine, where scripts/gpu_check.sh installs it into /tmp/site. The folder is emptied first:
# two versions of one package would stop that install.
set -euo pipefail
rm -rf .whl
mkdir -p .whl
plat=(--platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
while read -r spec; do
  [[ -z $spec || $spec == \#* ]] && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
      -d .whl "$spec" || python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "$spec"
done < "$(dirname "$0")/wheels.txt"
du -sh .whl
