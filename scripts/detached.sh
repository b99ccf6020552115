# Sourced by the scripts/gpu_*.sh measurement scripts: a long job on the device machine, run detached from a copy
# of the repo under /tmp (the device tool deletes ignored paths of the working copy that a later call does not
# carry, which would kill a job running there), and waited for across device calls.
#   detached_start DIR JOB LOG   copy the repo to DIR and start `bash JOB` there (JOB and LOG relative to DIR)
#   detached_wait DIR JOB LOG    wait up to WAIT seconds (default 540) while JOB runs; then cd DIR.
#                                Returns 0 once LOG ends with "JOB DONE", 1 while it runs, 2 when it died.
# It also sets the environment every such job runs under: offline, unbuffered, the project from source.

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONPATH=.

detached_start() {
  local dir=$1 job=$2 log=$3
  mkdir -p "$dir" && cp -r . "$dir/" && mkdir -p "$(dirname "$dir/$log")"
  (cd "$dir" && setsid nohup bash "$job" > "$log" 2>&1 < /dev/null &)
  sleep 5
}

detached_wait() {
  local dir=$1 job=$2 log=$3
  cd "$dir" || return 2
  local deadline=$((SECONDS + ${WAIT:-540}))
  while (( SECONDS < deadline )) && ! grep -q "JOB DONE" "$log" && pgrep -f "$job" > /dev/null; do sleep 10; done
  if grep -q "JOB DONE" "$log"; then return 0; fi
  if pgrep -f "$job" > /dev/null; then echo "STILL RUNNING ($(date +%H:%M:%S))"; tail -c 400 "$log"; return 1; fi
  echo "JOB DIED"; tail -30 "$log"; return 2
}

# Inside a job: every GPU test (TESTS, a -k expression, narrows them) in the background, in GPU_TEST_PROCS (default 8)
# pytest processes at once, recompiles logged (TORCH_LOGS); each process's output and exit status in DIR/tests_N.log.
# The job's `wait` waits for them.
gpu_tests_alongside() {
  local dir=$1 i procs=${GPU_TEST_PROCS:-8}
  mkdir -p "$dir"
  python3 -m pytest --collect-only -q -p no:cacheprovider -m gpu tests/test_gpu.py ${TESTS:+-k "$TESTS"} | grep "::" \
    > "$dir/test_ids.txt"
  for ((i = 0; i < procs; i++)); do
    awk -v i=$i -v n=$procs 'NR % n == i' "$dir/test_ids.txt" > "$dir/test_ids.$i"
    [[ -s $dir/test_ids.$i ]] || continue  # (fewer tests than processes)
    (TORCH_LOGS=recompiles timeout 900 python3 -m pytest -q -p no:cacheprovider -m gpu $(cat "$dir/test_ids.$i") \
       > "$dir/tests_$i.log" 2>&1; echo "gpu tests rc $?" >> "$dir/tests_$i.log") &
  done
}

# After the tests: each process's verdict, the failures' first lines, any recompile logged.
gpu_tests_verdict() {
  local dir=$1 f
  for f in "$dir"/tests_*.log; do grep -E "passed|failed|error" "$f" 2>/dev/null | tail -1; done
  grep -h -B2 -A30 "^____\|Error\b" "$dir"/tests_*.log | cut -c1-300 | head -60
  grep -h -A4 "Recompiling" "$dir"/tests_*.log | cut -c1-300 | head -20
}

# Inside a job: the demo pair trained up to threshold tuning (`./launch.sh full`, both models at once) into
# runs/full, on DATA's Multi30k (default .gpu/data), or up to the stage STOP names (a later call goes on from there);
# then DEMO_EVAL holds decode.eval over its three models on that data's test set, for the job to add its own
# key=value arguments to.
demo_pair_up_to_tuning() {
  local data=${1:-.gpu/data} stop=${2:-tune}
  PARALLEL_TRAIN=1 STOP_AFTER=$stop DATA_DIR=$data ./launch.sh full || return 1
  DEMO_EVAL=(python3 -m decode.eval --config configs/multi30k_eval.yaml --aligned large=runs/full/large/final
             small=runs/full/small/final aligned=runs/full/small_aligned/final dataset=$data/multi30k)
}

# After a wait: the logs to $OUT, the job's log, the tables of the benchmark logs named, each test log's verdict.
#   detached_report LOG BENCH_LOG...
detached_report() {
  local log=$1; shift
  [[ -n ${OUT:-} ]] && tar czf "$OUT/logs.tgz" runs/*.log runs/*.json 2>/dev/null  # one file: at most 8 come back
  cat "$log"
  for f in "$@"; do
    [[ -f $f ]] && { echo "== $f"; grep -v -i "warn" "$f" | grep -E "^\||^device|^family|^per pair|kernels|compiled in|^  " | cut -c1-250 | head -150; }
  done
  for f in runs/tests_*.log; do [[ -f $f ]] && { echo "== $f"; grep -E "^FAILED|^ERROR|passed|failed" "$f" | tail -12; }; done
}
