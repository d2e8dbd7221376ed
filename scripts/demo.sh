#!/usr/bin/env bash
# Set up stylequeue and run the main job: stylise the sample cat photo in the style of The Starry Night.
#
#   scripts/demo.sh                      # VGG19 ImageNet weights (torchvision downloads them once)
#   STYLEQUEUE_WEIGHTS=/path/vgg19.pth scripts/demo.sh    # weights from a file (or s3://...)
#   STYLEQUEUE_WEIGHTS=random:0 scripts/demo.sh           # offline smoke run: random weights, marked as such
#
# Extra arguments go to `stylequeue run` and replace the demo's own size and iteration count
# (256 px, 200 steps: a few minutes on a laptop CPU), for example --size 512 --device cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p out
[ $# -gt 0 ] || set -- --size 256 --iterations 200
exec "${STYLEQUEUE_VENV:-.venv}/bin/stylequeue" run \
  examples/content/chelsea.jpg examples/style/starry_night.jpg \
  -o out/chelsea_starry_night.png "$@"
