#!/usr/bin/env bash
# Index the VAE-TracIn authors' published β-VAE checkpoints on their 128 training images.
#
#   examples/official_vae/run.sh OUT_DIR SHARED_DIR [extra `proponent index` flags]
#
# SHARED_DIR is the folder holding checkpoints/ and images/ (../shared/vae-tracin-official).
# The model is the user's own code (examples/official_vae/model.py, factory `plugin`): proponent
# imports it (which runs it), loads the state dicts nested under model_states.net with
# weights_only=True, takes the training steps between checkpoints from their file names
# (iterations), and weights checkpoints by the authors' lr · batch · gap / N with
# `--convention visits` at query time. Then: proponent serve --index OUT_DIR
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR SHARED_DIR [extra proponent index flags]" >&2
  exit 2
fi
out=$1
shared=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
proponent=${PROPONENT:-proponent}
ckpts=()
for it in 50000 500000 1000000 1500000; do
  ckpts+=("$shared/checkpoints/$it")
done
exec $proponent index \
  --data "folder:$shared/images/train,mode=RGB" \
  --model-code "$here/model.py:plugin" \
  --checkpoints "${ckpts[@]}" \
  --checkpoint-key model_states.net \
  --iterations-from-names \
  --lr 3e-4 \
  --batch-size-trained 64 \
  --m 16 \
  --out "$out" \
  "$@"
