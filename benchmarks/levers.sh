#!/usr/bin/env bash
# The lever table in docs/benchmarks.md: the real `train` and `evaluate` stages for each setting, side by
# side (one GPU holds them all; on a CPU give each its own machine), params.yaml's train.epochs
# each (the CPU default's budget) unless the setting says otherwise, each keeping its last 5 validated weights
# so that best and averaged can be compared, then benchmarks/score.py on each run's best
# checkpoint and on ensembles built on the default's (its last 5 weights, seed2, r2l). SETTINGS
# picks which settings run. Needs data/raw/pairs/ (`dvc repro ingest`); each setting runs in a copy
# of the checkout under $ROOT.
#
#   bash benchmarks/levers.sh            # figures to stdout, logs and reports to $OUT
#   bash benchmarks/levers.sh train.max_steps=3 embed.epochs=1 evaluate.max_len_ratio=0.3   # a smoke test
#   SETTINGS="long big" bash benchmarks/levers.sh train.max_minutes=6   # longer plans, on a GPU
#   SETTINGS="default seed2 r2l" bash benchmarks/levers.sh   # seed, checkpoint and reranking ensembles
set -u
EXTRA="$*"
# Each setting's overrides (section.key=value, as benchmarks/common.py's params_with reads them),
# applied after the budget every setting shares and before the command line's.
COMMON="train.max_minutes=6 train.average_checkpoints=5 train.threads=2"
declare -A SETTING=([default]="" [plateau]="train.lr_schedule=plateau train.warmup_steps=0"
                    [previous]="train.dropout=0.3 train.label_smoothing=0.0 train.lr_schedule=plateau train.warmup_steps=0"
                    [batch5000]="train.batch_tokens=5000" [fullsoftmax]="train.sampled_softmax=0"
                    [hidden384]="train.hidden_size=384"  # and 1.3x the epochs (below): 1.3x as fast on a CPU
                    [worddrop]="train.word_dropout=0.1"
                    # Sennrich & Zhang's (2019) low-resource regularisers at their strength, where vamos has the knob
                    [recipe]="train.word_dropout=0.3 train.dropout=0.5 train.label_smoothing=0.2"
                    [subword]="prepare.subwords.model=bpe prepare.subwords.vocab_size=8000"
                    # with `default` in SETTINGS: another seed (word2vec's too: how far apart two trainings
                    # land; packed with the default, a seed ensemble) and a right-to-left model (it reranks
                    # the default's n-best lists); either adds the ensemble rows at the end
                    [seed2]="seed=4321" [r2l]="train.right_to_left=true"
                    # beyond the CPU's budget: what a GPU's minutes buy (the cosine plan decides the epochs)
                    [long]="train.epochs=24" [big]="train.hidden_size=1024 train.dropout=0.5 train.epochs=20")
read -ra NAMES <<< "${SETTINGS:-default plateau previous batch5000 fullsoftmax hidden384 worddrop subword}"
declare -A SEEN=()
for name in "${NAMES[@]}"; do  # checked before anything is deleted or installed
  [ -n "${SETTING[$name]+set}" ] || { echo "levers.sh: no setting '$name' (${!SETTING[*]})" >&2; exit 2; }
  [ -z "${SEEN[$name]+set}" ] || { echo "levers.sh: '$name' is named twice in SETTINGS" >&2; exit 2; }
  SEEN[$name]=1
done
[ ${#NAMES[@]} -gt 0 ] || { echo "levers.sh: SETTINGS names no setting" >&2; exit 2; }
OUT=${OUT:-/tmp/levers-out} ROOT=${ROOT:-/tmp/levers}
mkdir -p "$OUT"; rm -rf "$ROOT"; mkdir -p "$ROOT"
if [ -d .whl ]; then  # a lent machine without the project's packages: wheels carried beside the checkout
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# Read through the project's own validated params, once its packages are importable.
EPOCHS=$(PYTHONPATH=${PYTHONPATH:-}:$PWD python3 -c 'import sys; sys.path.insert(0, "benchmarks")
from common import params_with; print(params_with([]).train.epochs)') || exit 2
SETTING[hidden384]+=" train.epochs=$(( (EPOCHS * 13 + 5) / 10 ))"
vamos() { (cd "$ROOT/$1" && PYTHONPATH=${PYTHONPATH:-}:$PWD python3 -m pipeline.cli "$2" > "$OUT/$2_$1.log" 2>&1); }
for name in "${NAMES[@]}"; do
  cp -r . "$ROOT/$name"; rm -rf "$ROOT/$name"/reports/*.json "$ROOT/$name/reports/learning_curve.csv" "$ROOT/$name/.vamos"
  # shellcheck disable=SC2086 # the overrides are words
  (cd "$ROOT/$name" && python3 - $COMMON ${SETTING[$name]} $EXTRA <<'PY'
import sys

import yaml

sys.path.insert(0, "benchmarks")
from common import params_with  # validated, so a bad override stops here, before any training

from pipeline.config import PARAMS_FILE

params = params_with(sys.argv[1:]).model_dump(mode="json", by_alias=True)
PARAMS_FILE.write_text(yaml.safe_dump(params, sort_keys=False))
PY
  ) || exit 2
done
for name in "${NAMES[@]}"; do (vamos $name prepare && vamos $name embed && vamos $name train && vamos $name evaluate
  echo "$name: rc $?") & done; wait
for name in "${NAMES[@]}"; do
  (cd "$ROOT/$name" && PYTHONPATH=${PYTHONPATH:-}:$PWD python3 benchmarks/score.py .vamos/checkpoints/*/best.pt \
     > "$OUT/score_best_$name.md" 2>&1) &
done; wait
echo "| setting | train tokens/s | epochs | best valid BLEU | test BLEU (chrF), best epoch | test BLEU (chrF), last 5 averaged |"
echo "|---|---|---|---|---|---|"
for name in "${NAMES[@]}"; do
  d=$ROOT/$name; cp "$d/reports/learning_curve.csv" "$OUT/curve_$name.csv" 2>/dev/null
  python3 - "$d" "$name" "$OUT/score_best_$name.md" <<'PY'
import json, sys
d, name, best = sys.argv[1:]
try:
    t, s = json.load(open(f"{d}/reports/train.json")), json.load(open(f"{d}/reports/train_speed.json"))
    m = json.load(open(f"{d}/reports/metrics.json"))["test"]
    b = open(best).read().strip().splitlines()[-1].split("|")
    print(f"| {name} | {s['tokens_per_sec']:,.0f} | {t['epochs']} | {t['best_valid_bleu']:.2f} | "
          f"{b[3].strip()} ({b[4].strip()}) | {m['bleu']} ({m['chrf']}) |")
except (OSError, KeyError, IndexError, ValueError) as error:
    print(f"| {name} | failed: {error!r} (logs in $OUT) |")
PY
done
if [ -n "${SEEN[default]+set}" ] && [ -n "${SEEN[seed2]+set}${SEEN[r2l]+set}" ]; then
  # The default's best checkpoint against ensembles built on it, paired on the same sentences, each
  # source apart too: its own last 5 validated weights (a checkpoint ensemble); with seed2's best (a
  # seed ensemble) and with r2l's reranking, where they ran; all three where both ran.
  rm -rf "$OUT/snapshots" "$OUT/score_ensembles.md"
  (cd "$ROOT/default" && export PYTHONPATH=${PYTHONPATH:-}:$PWD && run=$(ls -d .vamos/checkpoints/*/) &&
   pack() { python3 -m pipeline.cli ensemble "${@:2}" -o "$OUT/$1.pt" >> "$OUT/ensembles.log" 2>&1 &&
            echo "$OUT/$1.pt"; } &&
   python3 benchmarks/snapshots.py "$run" -o "$OUT/snapshots" >> "$OUT/ensembles.log" 2>&1 &&
   models=("$(pack checkpoints "$OUT"/snapshots/weights-*.pt)") && members=("${run}best.pt") || exit 1
   for other in seed2 r2l; do
     [ -n "${SEEN[$other]+set}" ] || continue
     members+=("$(ls "$ROOT"/$other/.vamos/checkpoints/*/best.pt)") || exit 1
     models+=("$(pack "with_$other" "${run}best.pt" "${members[-1]}")") || exit 1
   done
   if [ ${#members[@]} -eq 3 ]; then models+=("$(pack seed2_r2l "${members[@]}")") || exit 1; fi
   python3 benchmarks/score.py "${run}best.pt" "${models[@]}" --by-origin > "$OUT/score_ensembles.md" 2>&1) ||
    echo "ensembles: failed (logs: $OUT/ensembles.log, $OUT/score_ensembles.md)"
  echo; echo "ensembles against the default's best checkpoint:"; cat "$OUT/score_ensembles.md" 2>/dev/null
fi
