#!/usr/bin/env bash
# Installs umt5_fast on a fresh machine, then runs the main job: the shipped tiny model (numbers to
# words in four languages) translating a few inputs through the C++ CPU kernels.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q torch==2.13.0  # local CPU wheel; an unpinned torch pulls GBs of CUDA wheels
python -m pip install -q -e .
if [ "$#" -eq 0 ]; then
  set -- "en: 4721" "de: 1999" "fr: 80" "es: 615"
fi
python -m umt5_fast generate --num-beams 1 "$@"
