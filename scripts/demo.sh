#!/usr/bin/env bash
# Set up stylequeue and run the main job the way the service runs it: stylise the sample cat photo in
# the style of The Starry Night as a job on a worker this script starts and stops (`stylequeue demo`:
# the zero-server defaults under out/.stylequeue-demo, no Redis, no S3, nothing left running).
#
#   scripts/demo.sh                      # VGG19 ImageNet weights (torchvision downloads them once)
#   STYLEQUEUE_WEIGHTS=/path/vgg19.pth scripts/demo.sh    # weights from a file (or s3://...)
#   STYLEQUEUE_WEIGHTS=random:0 scripts/demo.sh           # offline smoke run: random weights, marked as such
#   scripts/demo.sh --local              # the engine alone (`stylequeue run`), no worker, no queue
#
# The demo's size and iteration count (256 px, 200 steps: a few minutes on a laptop CPU) come first,
# so extra arguments replace them, in either mode: --size 512 --iterations 100 --device cuda.
# Output: out/chelsea_starry_night.png and its metadata out/chelsea_starry_night.png.json.
set -euo pipefail
cd "$(dirname "$0")/.."
command=demo
if [ "${1:-}" = "--local" ]; then
  command=run
  shift
fi
scripts/setup.sh
mkdir -p out
exec "${STYLEQUEUE_VENV:-.venv}/bin/stylequeue" "$command" \
  examples/content/chelsea.jpg examples/style/starry_night.jpg \
  -o out/chelsea_starry_night.png --size 256 --iterations 200 "$@"
