#!/bin/bash
# kill -9 the mnist example at random moments, resume it (--resume: the newest
# intact checkpoint), and check that the final weights and optimizer state are
# byte-identical to an uninterrupted run's.
#
#   cargo build --release --example mnist
#   crates/minibatch-train/scripts/kill9_resume.sh [runs, default 10] [binary]
#
# Each run is killed twice at a random moment (0.3-2.5 s after a start or
# resume) and then runs to the end; it prints the latest checkpoint at each
# kill and, at the end, how many runs ended identical.
set -u
cd "$(dirname "$0")/../../.."
RUNS=${1:-10}
BIN=${2:-target/release/examples/mnist}
TMP=$(mktemp -d)
ARGS="--hidden 32 --epochs 1 --schedule onecycle --checkpoint-every 20 --max-steps 600"
END=step-000000600
$BIN $ARGS --checkpoint-dir $TMP/ref --out-dir $TMP/ref-out > /dev/null 2>&1 || { echo "reference run failed"; exit 1; }
REF=$(cat $TMP/ref/$END/model.safetensors $TMP/ref/$END/optimizer.bin | md5sum)
ok=0; bad=0
for i in $(seq 1 "$RUNS"); do
  D=$TMP/run$i; kills=0; at=""
  while [ ! -d $D/$END ]; do
    R=""; [ -f $D/latest ] && R="--resume"
    $BIN $ARGS --checkpoint-dir $D --out-dir $D-out $R > /dev/null 2>&1 &
    pid=$!
    if [ $kills -lt 2 ]; then
      sleep "$(python3 -c 'import random; print(random.uniform(0.3, 2.5))')"
      if kill -9 $pid 2>/dev/null; then
        kills=$((kills + 1)); at="$at $(cat $D/latest 2>/dev/null || echo none)"
      fi
    fi
    wait $pid 2>/dev/null
  done
  GOT=$(cat $D/$END/model.safetensors $D/$END/optimizer.bin | md5sum)
  if [ "$GOT" == "$REF" ]; then ok=$((ok + 1)); else bad=$((bad + 1)); echo "run $i DIFFERS"; fi
  echo "run $i: $kills kills, latest checkpoint at each kill:$at"
done
rm -rf "$TMP"
echo "identical: $ok, different: $bad"
[ $bad -eq 0 ]
