#!/usr/bin/env bash
# Index the VAE-TracIn authors' published β-VAE checkpoints on their 128 training images.
#
#   examples/official_vae/run.sh OUT_DIR SHARED_DIR [extra `proponent index` flags]
#
# SHARED_DIR is the folder holding checkpoints/ and images/ (../shared/vae-tracin-official).
# The model is the user's own code (examples/official_vae/model.py, factory `plugin`): proponent
# imports it (which runs it), loads the state dicts nested under model_states.net with
# weights_only=True, reads the learning rate (optim_states.optim.param_groups[0].lr) and the
# iteration ('iter') from the files themselves; the batch size (64) is not in them and is given; it
# weights checkpoints by the authors' lr · batch · gap / N with
# `--convention visits` at query time. Then: proponent serve --index OUT_DIR
#
# The loss is the authors' training loss (factory `plugin`). AUTHORS_LOSS=1 uses the loss of their
# scoring code instead (factory `plugin_authors`: the reconstruction term divided by 3, as their
# unbatched `calc_loss` call computes it), which reproduces their tracin.py's numbers.
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
factory=plugin
if [ "${AUTHORS_LOSS:-0}" = 1 ]; then
  factory=plugin_authors
fi
ckpts=()
for it in 50000 500000 1000000 1500000; do
  ckpts+=("$shared/checkpoints/$it")
done
exec $proponent index \
  --data "folder:$shared/images/train,mode=RGB" \
  --model-code "$here/model.py:$factory" \
  --checkpoints "${ckpts[@]}" \
  --checkpoint-key model_states.net \
  --batch-size-trained 64 \
  --m 16 \
  --out "$out" \
  "$@"
