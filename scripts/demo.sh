#!/usr/bin/env bash
# The whole mission on the built-in synthetic world, on CPU:
#   synth -> shards -> preview -> short pre-training -> export (demo_out/export/) -> NAE fine-tuning on the
#   synthetic PRW-format set from (a) random init, (b) backbone-only and (c) full
#   pre-trained init at equal steps -> evaluation -> one comparison table + result PNG.
# Installs what it needs into ./.venv first.  Output: ${DEMO_OUT:-demo_out}/
set -euo pipefail
source "$(dirname "$0")/_env.sh"
OUT="${DEMO_OUT:-demo_out}"
SEED="${DEMO_SEED:-0}"
PRETRAIN_STEPS="${DEMO_PRETRAIN_STEPS:-300}"
FINETUNE_STEPS="${DEMO_FINETUNE_STEPS:-250}"
# A re-run starts from scratch; only a folder this script made (marker file) is removed.
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    if [ -f "$OUT/.hybridps-demo" ]; then
        rm -rf "$OUT"
    else
        echo "error: $OUT exists and was not made by this demo; set DEMO_OUT to another folder" >&2
        exit 2
    fi
fi
mkdir -p "$OUT" && touch "$OUT/.hybridps-demo"
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }

step "1/7 synthetic world (release-format copies of 9 datasets)"
"$PYTHON" -m hybridps.data_prep synth "$OUT/world" --seed "$SEED" --size small

step "2/7 shards from the five pre-training sources"
"$PYTHON" -m hybridps.data_prep build "$OUT/shards" \
    --source crowdhuman="$OUT/world/crowdhuman" --source ecp="$OUT/world/ecp" \
    --source msmt17="$OUT/world/msmt17" --source cuhk03="$OUT/world/cuhk03" \
    --source luperson="$OUT/world/luperson" --limit luperson=200 --workers 2
"$PYTHON" -m hybridps.data_prep inspect "$OUT/shards"
"$PYTHON" -m hybridps.data_prep preview "$OUT/shards" --out "$OUT/preview.png"

step "3/7 hybrid pre-training (L_ps + eta L_con + lambda L_adv)"
"$PYTHON" -m hybridps.pretrain --config pretrain/configs/tiny.yaml --shards "$OUT/shards" \
    --out "$OUT/pretrain" --max-steps "$PRETRAIN_STEPS"

step "4/7 export to downstream layouts (torchvision, timm, mmdet, detectron2; NAE/SeqNet for ResNet-50 runs)"
"$PYTHON" -m hybridps.checkpoints inspect "$OUT/pretrain/backbone.safetensors"
"$PYTHON" -m hybridps.checkpoints export "$OUT/pretrain" --out "$OUT/export"

step "5/7 NAE fine-tuning on synthetic PRW: random / backbone-only / full init, $FINETUNE_STEPS steps each"
for init in none backbone full; do
    case "$init" in
        none) args=(--init none) ;;
        backbone) args=(--init "$OUT/pretrain" --init-scope backbone) ;;
        full) args=(--init "$OUT/pretrain" --init-scope full) ;;
    esac
    "$PYTHON" -m hybridps.finetune train --config finetune/configs/tiny.yaml --dataset prw \
        --root "$OUT/world/prw" "${args[@]}" --out "$OUT/finetune_$init" \
        --max-steps "$FINETUNE_STEPS" --seed "$SEED"
done

step "6/7 evaluation (PRW protocol)"
for init in none backbone full; do
    "$PYTHON" -m hybridps.finetune eval --dataset prw --root "$OUT/world/prw" \
        --checkpoint "$OUT/finetune_$init" --out "$OUT/finetune_$init/eval"
done

step "7/7 comparison"
"$PYTHON" -m hybridps.finetune compare "$OUT"/finetune_none/eval "$OUT"/finetune_backbone/eval \
    "$OUT"/finetune_full/eval --names random backbone-only full --out "$OUT/comparison.md"
echo; echo "done: $OUT/comparison.md, $OUT/preview.png, $OUT/finetune_full/eval/*.png, exports in $OUT/export/"
