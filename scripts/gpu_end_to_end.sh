#!/usr/bin/env bash
# The demo pair end to end on one GPU, compiled passes against uncompiled ones: `./launch.sh full` up to threshold
# tuning (both models trained at once), then on the whole Multi30k test set, 3 interleaved timed passes per row, the
# large model, BiLD and lossless BiLD at the tuned points, unaligned and aligned: once with `compile=false` (the
# default) and once with `compile=true`. The two evaluations run in separate processes (a runner compiled after
# another in one process measured slower: BENCHMARKS.md), uncompiled first.
# B16=1: then, compiled, BiLD's throughput at batch 16 (throughput_systems=[bild]).
# RUN_TESTS=1: every GPU test alongside the training (in GPU_TEST_PROCS processes, default 8; tuning waits for them).
# UNCOMPILED=0: the compiled evaluation alone. TUNE_COMPILED=0: the pipeline up to tuning on uncompiled passes
# (BILD_COMPILE=0), as tuned before compiling was the default. BENCH=1: once the pair is trained, before tuning, the
# step at the Qwen2.5 0.5B, 1.5B and 7B shapes with the pair table (scripts/bench_step.py); BENCH=small: not those.
# Then (BENCH=1 or small) each shape of BENCH_SHAPES (default: Qwen2.5 0.5B and 1.5B) under each setting of
# BENCH_SETTINGS, each in a process of its own (as its first runner), with its kernels (--profile) and its checks'
# (--profile-checks): a setting is `default` or environment assignments joined by commas, e.g.
# BENCH_SETTINGS="default BILD_MLP_ACTIVATION=inline,BILD_SPLIT_VERDICT=1". BENCH_RUNS: instead, the runs one by one
# as shape@setting, e.g. BENCH_RUNS="qwen2.5_1.5b@TORCHINDUCTOR_CACHE_DIR=c1 qwen2.5_0.5b@default"; BENCH_ARGS: more
# arguments for each (e.g. "--prompt-length 4000"), BENCH_TIMEOUT its seconds (150). After each run,
# runs/best_configs.log counts the tuning results (inductor's .best_config files) it wrote into its on-disk cache, how
# many of them over an earlier process's (the same kernel source, tuned again), and the kernel sources it wrote; for up
# to 12 of those tuned again, the kernel's name and its result before and after.
# VERDICT=1: then a step's verdict six ways (scripts/bench_verdict.py). TRACE=1: then scripts/step_vs_check.py on the
# trained large model (bf16, compiled).
# SKINNY=1: then (before BENCH) a check's products one weight at a time (scripts/bench_skinny.py); SKINNY=sweep: with
# its sweep of blocks. EPILOGUE=1: then (before BENCH) a check layer's products as one kernel each, with their norms and
# epilogues, against today's (scripts/bench_epilogue.py). ATTENTION=1: then (before BENCH) one layer's attention per
# query head against grouped (scripts/bench_attention.py).
# COMPILE_BENCH=1: then (before SKINNY and BENCH) the 7B shape's compile time, cold and warm (scripts/bench_compile.py).
# PAIR=0: no demo pair (the tests and BENCH alone).
# BILD_CHECK_KERNEL=0 in the environment: the whole run with checks attending through SDPA (decode/compact.py).
#   bash scripts/gpu_end_to_end.sh start    # copies the repo to /tmp/bild-e, starts the job detached, waits WAIT s
#   bash scripts/gpu_end_to_end.sh wait     # a later call on the still-warm machine
# Data: .gpu/data/multi30k (a copy of ../shared/data/multi30k), named in the device call's carry. Results are packed
# into $OUT at every call.
set -uo pipefail
source scripts/detached.sh
W=/tmp/bild-e; R=runs/full; SCRIPT=runs/end_to_end_job.sh; LOG=runs/end_to_end_job.log
if [[ ${1:-wait} == start ]]; then
  mkdir -p runs
  cat > $SCRIPT <<JOB
set -x
source scripts/detached.sh
[[ ${TUNE_COMPILED:-1} == 0 ]] && export BILD_COMPILE=0
[[ ${RUN_TESTS:-0} == 1 ]] && gpu_tests_alongside runs
[[ ${PAIR:-1} == 1 ]] && { demo_pair_up_to_tuning .gpu/data align || exit 1; }
[[ ${RUN_TESTS:-0} == 1 ]] && { wait; gpu_tests_verdict runs; }
if [[ ${COMPILE_BENCH:-0} == 1 ]]; then  # the GPU to itself
  timeout 300 python3 scripts/bench_compile.py --shape qwen2.5_7b --device cuda --dtype bfloat16 \
    > runs/compile_7b.log 2>&1
fi
if [[ ${SKINNY:-0} != 0 ]]; then  # the GPU to itself
  sweep=(); [[ ${SKINNY:-0} == sweep ]] && sweep=(--sweep)
  timeout 240 python3 scripts/bench_skinny.py "\${sweep[@]}" --json runs/skinny.json > runs/skinny.log 2>&1
fi
if [[ ${EPILOGUE:-0} == 1 ]]; then  # the GPU to itself
  timeout 300 python3 scripts/bench_epilogue.py > runs/epilogue.log 2>&1
fi
if [[ ${ATTENTION:-0} == 1 ]]; then  # the GPU to itself
  timeout 200 python3 scripts/bench_attention.py > runs/attention.log 2>&1
fi
if [[ ${BENCH:-0} != 0 ]]; then  # the GPU to itself
  if [[ ${BENCH:-0} != small ]]; then
    timeout 400 python3 scripts/bench_step.py --shapes qwen2.5_0.5b qwen2.5_1.5b qwen2.5_7b --pairs --profile \
      --repeats 3 --json runs/step_real.json > runs/step_real.log 2>&1
  fi
  runs=(${BENCH_RUNS:-})  # shape@setting, in this order; else every shape under every setting
  if (( \${#runs[@]} == 0 )); then
    for shape in ${BENCH_SHAPES:-qwen2.5_0.5b qwen2.5_1.5b}; do
      for setting in ${BENCH_SETTINGS:-default}; do runs+=(\$shape@\$setting); done
    done
  fi
  i=0
  for run in "\${runs[@]}"; do  # each setting a process's first runner; its logs named by its place (runs repeat)
    shape=\${run%%@*}; setting=\${run#*@}; i=\$((i + 1))
    name=\${i}_\$(echo \$setting | tr '=,' '-_'); env=(); [[ \$setting == default ]] || env=(\${setting//,/ })
    cache=\$(env "\${env[@]}" python3 -c "from torch._inductor.runtime.cache_dir_utils import cache_dir; print(cache_dir())")
    find \$cache -name '*.best_config' 2>/dev/null | sort > runs/.configs_before; touch runs/.before_run
    tar -cPf runs/.configs_before.tar -T runs/.configs_before 2>/dev/null
    env "\${env[@]}" timeout ${BENCH_TIMEOUT:-150} python3 scripts/bench_step.py --shapes \$shape --profile --profile-checks --repeats 3 \
      ${BENCH_ARGS:-} --json runs/step_\${name}_\$shape.json > runs/step_\${name}_\$shape.log 2>&1
    find \$cache -name '*.best_config' -newer runs/.before_run 2>/dev/null | sort > runs/.configs_written
    # a result written again is a kernel whose source an earlier process generated too, tuned again; a new one, a new source
    echo "\$run: \$(wc -l < runs/.configs_written) tuning results written by this process" \
      "(\$(comm -12 runs/.configs_before runs/.configs_written | wc -l) of them over an earlier one's)," \
      "\$(find \$cache -name '*.py' -newer runs/.before_run 2>/dev/null | wc -l) kernel sources written," \
      "\$(find \$cache -name '*.best_config' 2>/dev/null | wc -l) results in its cache \$cache" >> runs/best_configs.log
    for f in \$(comm -12 runs/.configs_before runs/.configs_written | head -12); do  # which kernels, and what changed
      echo "  tuned again: \$(grep -om1 'def triton_[a-z_0-9]*' \${f%.best_config}.py 2>/dev/null)" \
        "before \$(tar -xOPf runs/.configs_before.tar \$f 2>/dev/null | head -c 400) now \$(head -c 400 \$f)"
    done >> runs/best_configs.log
  done
  [[ ${VERDICT:-0} == 1 ]] && timeout 150 python3 scripts/bench_verdict.py > runs/verdict.log 2>&1
fi
[[ ${PAIR:-1} == 1 ]] || { echo JOB DONE; exit 0; }
if [[ ${TRACE:-0} == 1 ]]; then
  timeout 200 python3 scripts/step_vs_check.py --model runs/full/large/final --dtype bfloat16 --compile \
    > runs/step_vs_check.log 2>&1
fi
demo_pair_up_to_tuning || exit 1
unset BILD_COMPILE
EV=("\${DEMO_EVAL[@]}" repeats=3 "systems=[large,bild,bild_exact]")
[[ ${UNCOMPILED:-1} == 1 ]] && "\${EV[@]}" compile=false out=$R/uncompiled
"\${EV[@]}" compile=true out=$R/compiled
if [[ ${B16:-0} == 1 ]]; then
  "\${EV[@]}" compile=true "systems=[large,bild]" "throughput_batch_sizes=[16]" "throughput_systems=[bild]" out=$R/b16
fi
echo JOB DONE
JOB
  detached_start $W $SCRIPT $LOG
fi
detached_wait $W $SCRIPT $LOG; rc=$?
[[ -n ${OUT:-} ]] && tar czf $OUT/end_to_end.tgz runs/*.log runs/*.json $R/uncompiled $R/compiled $R/b16* \
  $R/*/final/bild_thresholds.json $R/*.log 2>/dev/null
grep -v "it/s\]\|ex/s\]" $LOG | grep -E "===|after training|wrote|done:|rollback_threshold=|compiled|Error|error" | tail -20
(( rc == 0 )) && { echo FINISHED; for d in $R/uncompiled $R/compiled $R/b16*; do [[ -f $d/report.md ]] && { echo "== $d"; \
  grep -E "^\| |^- device" $d/report.md | cut -c1-260; }; done; }
for f in runs/best_configs.log runs/compile_7b.log runs/skinny.log runs/epilogue.log runs/attention.log runs/step_real.log runs/step_*_*.log runs/verdict.log runs/step_vs_check.log; do
  [[ -f $f ]] && { echo "== $f"; grep -E "^\||^per pair|kernels per|differ for|fastest|tuning results|q/k/v, gate/up and down" $f | cut -c1-250 | head -70; }
done
exit 0
