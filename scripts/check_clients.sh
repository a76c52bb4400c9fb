#!/usr/bin/env bash
# Load every export through the real downstream client's own loading code, in that client's
# own (old) environment, and print the "verified loads" table of the README.
#
#   bash scripts/check_clients.sh            # set up what is missing, export, load, print the table
#   bash scripts/check_clients.sh --setup    # only build the client environments
#
# What it builds, under $HYBRIDPS_CLIENTS_DIR (default ~/.cache/hybridps/clients):
#   seqnet37/   Python 3.7 venv: torch 1.2.0, torchvision 0.4.0, numpy 1.16, Pillow 6.1, yacs, tabulate (SeqNet's pin)
#   nae27-site/ Python 2.7 site dir: torch 1.2.0, torchvision 0.4.0, numpy 1.16.6, Pillow 6.2.2, huepy, future (NAE4PS)
#   psvis38/    Python 3.8 venv: torch 1.7.0, torchvision 0.8.1, mmcv 1.3.9 (MMCV_WITH_OPS=0), psvis 1.6.0 --no-deps
#   alignps38/  Python 3.8 venv: torch 1.7.0, torchvision 0.8.1, mmcv 1.1.6 (MMCV_WITH_OPS=0) + AlignPS' own mmdet
#   pydeps/     pure-Python packages for detectron2 and SeqNet on the project's Python: fvcore, iopath,
#               omegaconf, pycocotools (wheel), yacs, tabulate, termcolor, portalocker
# detectron2 runs from its source tree on the project's Python without building detectron2._C.
#
# Client source trees are not on PyPI; point at checkouts (commits seen to work in brackets):
#   CLIENT_SRC_DETECTRON2  facebookresearch/detectron2 [02b5c4e]
#   CLIENT_SRC_SEQNET      serend1p1ty/SeqNet          [edec285]
#   CLIENT_SRC_NAE4PS      DeanChan/NAE4PS             [ec43d1e]
#   CLIENT_SRC_ALIGNPS     daodaofr/AlignPS            [5d62dbc]
#   CLIENT_SRC_DIFFUSIONDET ShoufaChen/DiffusionDet    [1efb36d]  (optional: PSDiff's code is unpublished)
# (default: $HYBRIDPS_CLIENTS_DIR/src/<owner>+<name>).  A client whose interpreter, source tree or
# packages cannot be had is skipped with the reason, and the table says so.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/scripts/clients"
DIR="${HYBRIDPS_CLIENTS_DIR:-$HOME/.cache/hybridps/clients}"
PROJECT_PY="${HYBRIDPS_PROJECT_PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || command -v python3)}"
SRC_D2="${CLIENT_SRC_DETECTRON2:-$DIR/src/facebookresearch+detectron2}"
SRC_SEQNET="${CLIENT_SRC_SEQNET:-$DIR/src/serend1p1ty+SeqNet}"
SRC_NAE="${CLIENT_SRC_NAE4PS:-$DIR/src/DeanChan+NAE4PS}"
SRC_ALIGNPS="${CLIENT_SRC_ALIGNPS:-$DIR/src/daodaofr+AlignPS}"
SRC_DIFFDET="${CLIENT_SRC_DIFFUSIONDET:-$DIR/src/ShoufaChen+DiffusionDet}"
EXPORTS="$DIR/exports"
LOG="$DIR/logs"
TODAY="$(date -u +%Y-%m-%d)"
mkdir -p "$DIR" "$LOG" "$EXPORTS"
ROWS=()

say() { echo "[check_clients] $*" >&2; }
skip() {  # client, reason
    say "SKIP $1: $2"
    ROWS+=("| $1 | - | - | - | - | - | not run | $TODAY: skipped: $2 |")
}

interp() {  # X.Y -> path of a pythonX.Y, or nothing
    local v="$1" p
    p="$(command -v "python$v" 2>/dev/null)" && "$p" -c 1 2>/dev/null && { echo "$p"; return; }
    for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python "/usr/bin/python$v" "/usr/local/bin/python$v"; do
        [ -x "$p" ] && "$p" -c 1 2>/dev/null && { echo "$p"; return; }
    done
}

# ------------------------------------------------------------------ environments
setup_pydeps() {
    [ -f "$DIR/pydeps/.ok" ] && return 0
    say "installing detectron2/SeqNet pure-Python deps into $DIR/pydeps"
    "$PROJECT_PY" -m pip install -q --target "$DIR/pydeps" --no-deps fvcore==0.1.5.post20221221 iopath==0.1.10 \
        omegaconf antlr4-python3-runtime==4.9.3 yacs termcolor portalocker tabulate >"$LOG/pydeps.log" 2>&1 &&
    "$PROJECT_PY" -m pip install -q --target "$DIR/pydeps" --no-deps --only-binary :all: pycocotools \
        >>"$LOG/pydeps.log" 2>&1 && touch "$DIR/pydeps/.ok" || { echo "pip failed, see $LOG/pydeps.log"; return 1; }
}

setup_seqnet37() {
    [ -f "$DIR/seqnet37/.ok" ] && return 0
    local py; py="$(interp 3.7)"; [ -n "$py" ] || { echo "no Python 3.7 interpreter (torch 1.2 wheels need 2.7/3.5-3.7)"; return 1; }
    say "building $DIR/seqnet37 (torch 1.2.0 from PyPI, ~750 MB)"
    "$py" -m venv "$DIR/seqnet37" && "$DIR/seqnet37/bin/pip" install -q torch==1.2.0 torchvision==0.4.0 \
        "numpy==1.16.*" "Pillow==6.1.*" yacs tabulate >"$LOG/seqnet37.log" 2>&1 && touch "$DIR/seqnet37/.ok" ||
        { echo "pip failed, see $LOG/seqnet37.log"; return 1; }
}

setup_nae27() {
    [ -f "$DIR/nae27-site/.ok" ] && return 0
    local py; py="$(interp 2.7)"; [ -n "$py" ] || { echo "no Python 2.7 interpreter (NAE4PS is Python-2 code)"; return 1; }
    say "building $DIR/nae27-site (torch 1.2.0 for Python 2.7)"
    # pip 19 (the last for 2.7) treats a configured constraints file as requirements and would
    # install another torch: read no pip config here
    PIP_CONFIG_FILE=/dev/null "$py" -m pip install -q --target "$DIR/nae27-site" torch==1.2.0 torchvision==0.4.0 \
        numpy==1.16.6 Pillow==6.2.2 huepy future >"$LOG/nae27.log" 2>&1 &&
        PYTHONPATH="$DIR/nae27-site" "$py" -c "import torch; assert torch.__version__ == '1.2.0', torch.__version__" &&
        touch "$DIR/nae27-site/.ok" || { echo "pip failed, see $LOG/nae27.log"; return 1; }
}

setup_mmcv38() {  # name, mmcv version, extra packages
    local name="$1" mmcv="$2"; shift 2
    [ -f "$DIR/$name/.ok" ] && return 0
    local py; py="$(interp 3.8)"; [ -n "$py" ] || { echo "no Python 3.8 interpreter (torch 1.7 wheels need 3.6-3.8)"; return 1; }
    say "building $DIR/$name (torch 1.7.0, mmcv $mmcv without compiled ops)"
    "$py" -m venv "$DIR/$name" && "$DIR/$name/bin/pip" install -q torch==1.7.0 torchvision==0.8.1 "$@" \
        >"$LOG/$name.log" 2>&1 &&
        MMCV_WITH_OPS=0 "$DIR/$name/bin/pip" install -q "mmcv==$mmcv" >>"$LOG/$name.log" 2>&1 &&
        touch "$DIR/$name/.ok" || { echo "pip failed, see $LOG/$name.log"; return 1; }
}

setup_psvis38() {
    setup_mmcv38 psvis38 1.3.9 || return 1
    [ -d "$DIR/psvis38/lib/python3.8/site-packages/psvis" ] ||
        "$DIR/psvis38/bin/pip" install -q --no-deps psvis==1.6.0 >>"$LOG/psvis38.log" 2>&1 ||
        { echo "pip install psvis failed, see $LOG/psvis38.log"; return 1; }
}

setup_alignps38() { setup_mmcv38 alignps38 1.1.6 terminaltables; }

declare -A WHY   # env -> why it could not be built (empty: ready)
for env in pydeps seqnet37 nae27 psvis38 alignps38; do
    if msg="$(setup_$env)"; then WHY[$env]=""; else WHY[$env]="${msg:-setup failed, see $LOG}"; say "$env: ${WHY[$env]}"; fi
done
[ "${1:-}" = "--setup" ] && exit 0

# ------------------------------------------------------------------ exports
say "writing the exports with hybridps ckpt convert ($PROJECT_PY)"
PYTHONPATH="$ROOT" "$PROJECT_PY" "$HERE/make_exports.py" "$EXPORTS" | tee "$LOG/exports.log" >&2 ||
    { say "exporting failed"; exit 1; }

run() {  # label, then the command; RESULT lines become table rows
    local label="$1"; shift
    say "running $label"
    local out; out="$("$@" 2>"$LOG/$label.err")"; local rc=$?
    echo "$out" | grep -v '^RESULT' >>"$LOG/$label.out"
    if ! grep -q '^RESULT' <<<"$out"; then
        skip "$label" "probe failed (rc=$rc): $(grep -v 'Warning\|warn' "$LOG/$label.err" | tail -1 | cut -c1-120)"
        return
    fi
    while IFS=$'\t' read -r _ client version call loaded missing unexpected forward note; do
        ROWS+=("| $client | $version | \`$call\` | $loaded | $missing | $unexpected | $forward | $TODAY${note:+; $note} |")
    done < <(grep '^RESULT' <<<"$out")
}

run timm-torchvision env PYTHONPATH="$ROOT" "$PROJECT_PY" "$HERE/probe_timm_torchvision.py" "$EXPORTS"

if [ ! -d "$SRC_D2/detectron2" ]; then skip detectron2 "source tree not found at $SRC_D2 (set CLIENT_SRC_DETECTRON2)"
elif [ -n "${WHY[pydeps]}" ]; then skip detectron2 "${WHY[pydeps]}"
else
    [ -d "$SRC_DIFFDET/diffusiondet" ] || { skip DiffusionDet "source tree not found at $SRC_DIFFDET (set CLIENT_SRC_DIFFUSIONDET)"; SRC_DIFFDET=""; }
    run detectron2 env PYTHONPATH="$DIR/pydeps" "$PROJECT_PY" "$HERE/probe_detectron2.py" "$SRC_D2" "$EXPORTS" $SRC_DIFFDET
fi

if [ ! -f "$SRC_SEQNET/models/seqnet.py" ]; then skip SeqNet "source tree not found at $SRC_SEQNET (set CLIENT_SRC_SEQNET)"
else
    if [ -n "${WHY[seqnet37]}" ]; then skip "SeqNet (torch 1.2)" "${WHY[seqnet37]}"
    else run seqnet-torch1.2 "$DIR/seqnet37/bin/python" "$HERE/probe_seqnet.py" "$SRC_SEQNET" "$EXPORTS" \
        seqnet.pth seqnet_zip_newrpn.pth seqnet_legacyformat_newrpn.pth; fi
    if [ -n "${WHY[pydeps]}" ]; then skip "SeqNet (current torch)" "${WHY[pydeps]}"
    else run seqnet-current env PYTHONPATH="$DIR/pydeps" "$PROJECT_PY" "$HERE/probe_seqnet.py" "$SRC_SEQNET" \
        "$EXPORTS" seqnet.pth seqnet_zip_newrpn.pth; fi
fi

if [ ! -f "$SRC_NAE/lib/model/faster_rcnn_norm_aware.py" ]; then skip NAE4PS "source tree not found at $SRC_NAE (set CLIENT_SRC_NAE4PS)"
elif [ -n "${WHY[nae27]}" ]; then skip NAE4PS "${WHY[nae27]}"
else run nae4ps env PYTHONPATH="$DIR/nae27-site" "$(interp 2.7)" "$HERE/probe_nae.py" "$SRC_NAE" "$EXPORTS" nae.pth; fi

if [ -n "${WHY[psvis38]}" ]; then skip psvis "${WHY[psvis38]}"
else run psvis "$DIR/psvis38/bin/python" "$HERE/probe_psvis.py" "$EXPORTS" psvis_resnet50.pth; fi

if [ ! -d "$SRC_ALIGNPS/mmdet" ]; then skip AlignPS "source tree not found at $SRC_ALIGNPS (set CLIENT_SRC_ALIGNPS)"
elif [ -n "${WHY[alignps38]}" ]; then skip AlignPS "${WHY[alignps38]}"
else run alignps env PYTHONPATH="$SRC_ALIGNPS" "$DIR/alignps38/bin/python" "$HERE/probe_alignps.py" "$EXPORTS" alignps.pth; fi

# ------------------------------------------------------------------ the table
echo
echo "| client | version | loading call | loaded | missing | unexpected | forward pass | date / notes |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "loaded: model keys holding the file's value after the client's own load; missing: model keys it"
echo "did not fill (heads the file does not carry); unexpected: file keys the client did not use."
echo "Files: every export is \`hybridps ckpt convert\` output with default options, from a random-weight"
echo "ResNet-50 run (scripts/clients/make_exports.py). Rows marked pre-fix show what issue 10 fixed:"
echo "'pre-fix bottom_up names' = the old detectron2 naming; seqnet_zip_newrpn.pth = the old nae/seqnet"
echo "default (zip container, rpn.head.conv.0.0.*); seqnet_legacyformat_newrpn.pth = old --legacy-format"
echo "without --legacy-rpn (now refused): SeqNet leaves its RPN conv random without a word."
echo "logs: $LOG"
