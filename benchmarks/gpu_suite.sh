#!/usr/bin/env bash
# Issue 11 on one 4-GPU machine, one mode per call (each mode fits a 10-minute call; estimates below):
#
#   OUT=$OUT benchmarks/gpu_suite.sh parity        # ~4-6 min: reference, 1-process self-check, 2 GPUs, 4 GPUs in 4 groups
#   OUT=$OUT benchmarks/gpu_suite.sh parity_clip   # ~3 min: every strategy with clipping by norm, 2 then 4 GPUs
#   OUT=$OUT benchmarks/gpu_suite.sh two_nodes     # ~2 min: two torchrun agents as 2 nodes x 2 GPUs, parity
#   OUT=$OUT benchmarks/gpu_suite.sh parity_bf16   # ~3-4 min: every strategy under bf16-mixed against dp bf16, 4 then 2 GPUs
#   OUT=$OUT benchmarks/gpu_suite.sh throughput    # ~5-7 min: 1.3B at 4 GPUs, ours then the peers (Lightning, DTensor TP)
#   OUT=$OUT benchmarks/gpu_suite.sh throughput7b  # ~5-7 min: ~6.7B at 4 GPUs, batch 2/GPU (ddp expected OOM)
#   OUT=$OUT benchmarks/gpu_suite.sh reduce        # ~3 min: ZeRO reducing in bf16 beside Lightning fsdp, 1.3B and ~6.7B
#   OUT=$OUT benchmarks/gpu_suite.sh dp_tuning     # ~4 min: dp's bucket sizes and NCCL SM limits, 1.3B, and 1 GPU
#   OUT=$OUT benchmarks/gpu_suite.sh zero7b        # ~5 min: zero2/zero3 (fp32 and bf16 reduce) beside fsdp and FSDP2 at ~6.7B
#   OUT=$OUT benchmarks/gpu_suite.sh offload       # ~3-4 min: 1.3B at 2 GPUs: zero3, zero3_offload, FSDP2
#   OUT=$OUT benchmarks/gpu_suite.sh pipeline      # ~4-6 min: torch.distributed.pipelining vs ours, 1.3B at 4 GPUs
#   OUT=$OUT benchmarks/gpu_suite.sh profile       # ~3 min: torch.profiler summaries of tp1d, dp, zero3 (1.3B) per rank
#   OUT=$OUT benchmarks/gpu_suite.sh two_gpu       # ~6 min on 2 GPUs: parity at 2, tp1d / zero2 / DTensor TP at 2, tp1d profile
#   OUT=$OUT benchmarks/gpu_suite.sh two_gpu_speed # ~4 min on 2 GPUs: dp 1 vs 2 GPUs, ddp, tp1d, zero2, DTensor TP, profile
#   OUT=$OUT benchmarks/gpu_suite.sh four_gpu      # ~6 min: tp1d chunks / zero2 / DTensor TP, dp 4 vs 1 GPU, pipeline_equal
#   OUT=$OUT benchmarks/gpu_suite.sh final_speed   # ~5 min: tp1d (deferral on/off), zero2, DTensor TP, dp (and bf16 reduce) 4 vs 1
#   OUT=$OUT benchmarks/gpu_suite.sh pipeline_fair # ~6 min: our 3 schedules and torch's, one variant per process, 2 rounds
#   OUT=$OUT benchmarks/gpu_suite.sh check_2gpu    # ~3 min on 2 GPUs: parity (fp32, bf16), dp / bf16 reduce / ddp at 2 vs 1 GPU
#   OUT=$OUT benchmarks/gpu_suite.sh idle_dp       # ~2 min on 2 GPUs: dp profiled at 1 and 2 GPUs, ddp at 2 (idle gaps explained)
#   BASE=DIR OUT=$OUT benchmarks/gpu_suite.sh pipeline_ab # ~5 min on 2 GPUs: pipeline parity; 1F1B here vs at BASE vs torch
#   OUT=$OUT benchmarks/gpu_suite.sh tp1d_4gpu     # ~2 min: tp1d / zero2 / DTensor TP at 4 GPUs, batch 4 then 8 per GPU
#   OUT=$OUT benchmarks/gpu_suite.sh pipeline_equal # ~1-2 min: the same with a 2048-token vocabulary (stages of equal time)
#   OUT=$OUT benchmarks/gpu_suite.sh dp_grouped    # ~3 min on 4 GPUs: dp (grouped) vs flat buckets vs ddp, parity first
#   OUT=$OUT benchmarks/gpu_suite.sh zero7b_tp1d_profile # ~8 min on 4 GPUs: ZeRO at 6.7 B beside fsdp/FSDP2; tp1d profiled
#   OUT=$OUT benchmarks/gpu_suite.sh zero_vs_fsdp  # ~5 min on 4 GPUs: ZeRO beside fsdp/FSDP2 at 6.7 B (peers first), 1.3 B
#   OUT=$OUT benchmarks/gpu_suite.sh offload_2gpu  # 2 GPUs: zero3 on the host, with NVMe spill, FSDP2 + CPUOffloadPolicy
#   OUT=$OUT benchmarks/gpu_suite.sh tp2d          # ~4 min on 4 GPUs: tp2d parity (2 x 2 grid), then beside tp1d and zero2
#   OUT=$OUT benchmarks/gpu_suite.sh tp2d_check    # ~3 min on 4 GPUs: tp2d / tp2.5d parity, a checkpoint chain through them
#   OUT=$OUT benchmarks/gpu_suite.sh hybrid_parity # ~3 min on 4 GPUs: hybrid (data 2 x tensor 2 + ZeRO, pipeline 2 x tensor 2)
#   OUT=$OUT benchmarks/gpu_suite.sh hybrid_speed  # ~8 min on 4 GPUs: hybrid beside the single methods, 1.3B
#   OUT=$OUT benchmarks/gpu_suite.sh tp1d_check    # ~3 min on 4 GPUs: tp1d and hybrid parity with clipping, tp1d beside zero2
#   OUT=$OUT benchmarks/gpu_suite.sh hybrid_mb     # ~2 min on 4 GPUs: pipeline 2 x tensor 2 with 8, 4, 2 microbatches, no SP
#   OUT=$OUT benchmarks/gpu_suite.sh hybrid_nodes  # ~5 min on 4 GPUs: hybrid across two torchrun "nodes"; pp2 x tp2 profiled
#
# Issue 15 on one 8-GPU machine (nvidia-h100-x8), one mode per call, each under 9 minutes:
#
#   OUT=$OUT benchmarks/gpu_suite.sh eight_gpu_parity   # ~4-5 min: every strategy's parity with clipping at 8 GPUs
#                                                       # (pipelines at 8 stages, hybrid 2 x 2 x 2, tp2.5d q 2 x d 2,
#                                                       # tp3d 2 x 2 x 2), the grid modes under bf16, a checkpoint chain
#   OUT=$OUT benchmarks/gpu_suite.sh eight_gpu_speed    # ~5 min: 1.3B at 8 GPUs: dp, zero1-3, tp1d, pipeline, hybrid
#                                                       # beside ddp, fsdp, FSDP2, DTensor TP; zero2 at 1 and 8 GPUs
#   OUT=$OUT benchmarks/gpu_suite.sh eight_gpu_7b       # ~6 min: the same at ~6.7B (dp, zero1, ddp may OOM), and our
#                                                       # 1F1B / interleaved beside torch's at 8 stages
#   OUT=$OUT benchmarks/gpu_suite.sh eight_gpu_pipeline # ~4-5 min: 1F1B and interleaved at 8 stages beside torch's
#                                                       # (1.3B, equal stages), one variant per process, 2 rounds
#   CPU=1 OUT=/tmp/x benchmarks/gpu_suite.sh MODE  # the same cases on gloo with tiny sizes (tests this script)
#
# Every case runs under `timeout`; afterwards every process it left behind (torchrun starts workers in new sessions,
# so they are found by an environment marker, GPU_SUITE_CASE, not by name) is killed, so leftover workers of a hung
# case cannot hold the GPUs for the next one. `selftest_hang` checks this with a case that never ends. Results: $OUT/MODE.log (all cases' output), $OUT/MODE.json
# (all cases' JSON), $OUT/MODE_summary.txt (the table printed at the end).
set -u
MODE=${1:?usage: benchmarks/gpu_suite.sh eight_gpu_parity|eight_gpu_speed|eight_gpu_7b|eight_gpu_pipeline|parity|tp2d|tp2d_check|checkpoints|checkpoint_speed|tp1d_check|hybrid_parity|hybrid_speed|hybrid_mb|hybrid_nodes|parity_clip|two_nodes|final_speed|dp_grouped|zero_vs_fsdp|offload_2gpu|zero7b_tp1d_profile|two_gpu|two_gpu_speed|four_gpu|check_2gpu|idle_dp|pipeline_ab|tp1d_4gpu|tp1d_2gpu|pipeline_2gpu|parity_pipeline_2gpu|zero_bubble_2gpu|deferred_2gpu|profile_1f1b_2gpu|casts_2gpu|pipeline_fair|collective_matmul|nccl_proto_4gpu|parity_bf16|throughput|throughput7b|reduce|dp_tuning|zero7b|offload|pipeline|pipeline_equal|profile}
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
OUT=${OUT:-$PWD/suite_out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_suite.XXXXXX)
LOG=$OUT/$MODE.log
: > "$LOG"
CPU=${CPU:-0}
PY=${PYTHON:-python}
SUMMARY=()
CASES=()

if [ "$CPU" = 1 ]; then
  ACC="--accelerator cpu"
  PAR="--layers 8 --width 32 --heads 4 --seq 16 --vocab 64 --steps 4"
  THR="--layers 8 --width 64 --heads 4 --vocab 128 --seq 32 --batch 2 --steps 2 --warmup 1 --microbatches 4"
  THR7=$THR
  # At 8 processes: 16 blocks for an interleaved pipeline of 8 stages x 2 chunks, 8 heads for DTensor TP over 8
  # ranks (the GPU presets have 24 / 32 blocks and 16 / 32 heads)
  THR8="--layers 16 --heads 8"
  SCALE=3   # CPU cases get 3x the GPU time limits
else
  ACC="--accelerator gpu"
  PAR=""
  THR="--model 1.3b"
  THR7="--model 7b"
  THR8=""
  SCALE=1
fi
NVME="--nvme-dir $WORK/nvme"

gpus() {  # gpus N -> the CUDA_VISIBLE_DEVICES setting for N GPUs: the first N (0,1,2,3 for 4; 0,...,7 for 8)
  seq -s, 0 $(($1 - 1))
}

kill_case() {  # kill_case TAG SIGNAL: every process started by one case (found by its environment marker)
  local d pid
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [ "$pid" = "$$" ] && continue
    if { tr '\0' '\n' < "$d/environ"; } 2>/dev/null | grep -qx "GPU_SUITE_CASE=$1"; then
      kill "-$2" "$pid" 2>/dev/null
    fi
  done
}

left_over() {  # left_over TAG: how many processes of the case are still alive
  local d n=0
  for d in /proc/[0-9]*; do
    [ "${d#/proc/}" = "$$" ] && continue
    { tr '\0' '\n' < "$d/environ"; } 2>/dev/null | grep -qx "GPU_SUITE_CASE=$1" && n=$((n + 1))
  done
  echo $n
}

run_case() {  # run_case NAME LIMIT_S NPROC ARGS... (ARGS: the script and its arguments; NPROC 0: one plain process)
  local name=$1 limit=$(( $2 * SCALE )) nproc=$3
  shift 3
  local clog=$WORK/$name.log t0=$SECONDS rc tag="$$-$name"
  echo "=== $name: $nproc process(es), limit ${limit}s, $(date +%T)"
  # torchrun starts its workers in new sessions: they are found afterwards by the marker in their environment,
  # not by process group or name, so only this case's processes are killed.
  if [ "$nproc" = 0 ]; then
    GPU_SUITE_CASE=$tag CUDA_VISIBLE_DEVICES=$(gpus 1) timeout -k 20 "$limit" $PY "$@" > "$clog" 2>&1
  else
    GPU_SUITE_CASE=$tag CUDA_VISIBLE_DEVICES=$(gpus "$nproc") timeout -k 20 "$limit" \
      $PY -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$@" > "$clog" 2>&1
  fi
  rc=$?
  if [ "$(left_over "$tag")" != 0 ]; then
    kill_case "$tag" TERM; sleep 3; kill_case "$tag" KILL; sleep 1
    echo "  (killed leftover processes of $name; $(left_over "$tag") remain)"
  fi
  { echo "=================== $name (rc $rc, $((SECONDS - t0)) s): $*"; cat "$clog"; } >> "$LOG"
  grep -E '^(parity|resume|throughput|  [a-z_0-9]+ +save |pipeline peer|reference|fused|sync check|FAIL)[: ]|^  [A-Za-z0-9_]+ +(PASS|FAIL|ok|oom|error) ' "$clog"
  if [ "$rc" != 0 ]; then
    echo "  !! rc $rc$([ "$rc" = 124 ] && echo ' (timeout)'); last errors:"
    grep -E 'Error|error:|Timeout|timed out' "$clog" | grep -v Warning | tail -4 | cut -c1-300
  fi
  CASES+=("$clog")
  SUMMARY+=("$(printf '%-26s rc %-3s %4d s' "$name" "$rc" $((SECONDS - t0)))")
}

scaling() {  # scaling VARIANT ONE_GPU_JSON N_GPU_JSON: tokens/s at N GPUs over N x tokens/s at 1 (the same batch per
  # GPU in both, so 1.0 is perfect weak scaling); into the log and the summary
  local line
  line=$($PY - "$@" <<'PY'
import json, sys
name, paths = sys.argv[1], sys.argv[2:]
try:
    runs = [json.load(open(p)) for p in paths]
    one, many = [next(r for r in run["rows"] if r["variant"] == name and r["status"] == "ok") for run in runs]
except (OSError, StopIteration, ValueError) as e:
    print(f"scaling: {name}: not measured ({type(e).__name__}: a case failed)")
    sys.exit()
n = runs[1]["world"]
print(f"scaling: {name} 1 -> {n} GPUs: {one['tokens_per_s']:,.0f} -> {many['tokens_per_s']:,.0f} tok/s, efficiency "
      f"{many['tokens_per_s'] / (n * one['tokens_per_s']):.3f} (tokens/s at {n} / ({n} x at 1))")
PY
)
  echo "$line" | tee -a "$LOG"
  SUMMARY+=("$line")
}

MG=benchmarks/multi_gpu.py
REF=$WORK/reference.json
case $MODE in
  parity)
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR
    run_case parity_1proc_self 60 0 $MG parity --reference "$REF" --out "$WORK/parity_1proc.json" $ACC
    run_case parity_2gpu_all 150 2 $MG parity --reference "$REF" --out "$WORK/parity_2gpu.json" $ACC $NVME
    run_case parity_4gpu_dp_zero 75 4 $MG parity --reference "$REF" --out "$WORK/parity_4gpu_dp_zero.json" $ACC \
      --only dp,zero1,zero2,zero3
    run_case parity_4gpu_offload 75 4 $MG parity --reference "$REF" --out "$WORK/parity_4gpu_offload.json" $ACC $NVME \
      --only zero2_offload,zero3_offload,zero3_half_host,zero3_nvme
    run_case parity_4gpu_tp 60 4 $MG parity --reference "$REF" --out "$WORK/parity_4gpu_tp.json" $ACC \
      --only tp1d,tp1d_sp,tp1d_2way
    run_case parity_4gpu_pipeline 90 4 $MG parity --reference "$REF" --out "$WORK/parity_4gpu_pipeline.json" $ACC \
      --only pipeline_1f1b,pipeline_gpipe,pipeline_interleaved,pipeline_zero_bubble,pipeline_chimera,pipeline_1f1b_deferred,\
pipeline_1f1b_2stages
    ;;
  parity_clip)  # every strategy's parity with clipping by norm (the one global-norm path over every axis): ~3 min
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR --clip 0.05
    run_case parity_clip_2gpu 150 2 $MG parity --reference "$REF" --out "$WORK/parity_clip_2gpu.json" $ACC $NVME
    run_case parity_clip_4gpu 200 4 $MG parity --reference "$REF" --out "$WORK/parity_clip_4gpu.json" $ACC $NVME
    ;;
  two_nodes)  # two torchrun agents (--nnodes 2, 2 GPUs each, rendezvous on localhost) as two nodes: parity of the
    # strategies whose groups then cross the "nodes" (data axes of zero3, dp, tp1d 2 x data 2, pipeline 2 x data 2): ~2 min
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR
    cpu_flag=""; [ "$CPU" = 1 ] && cpu_flag="--cpu"
    run_case parity_two_nodes 150 0 benchmarks/two_nodes.py --nproc 2 $cpu_flag -- $MG parity --reference "$REF" \
      --out "$WORK/parity_two_nodes.json" $ACC --only dp,zero3,tp1d_2way,pipeline_1f1b_2stages
    ;;
  parity_bf16)
    run_case reference 60 0 $MG reference --out "$REF" $ACC $PAR
    run_case parity_bf16_4gpu 200 4 $MG parity --precision bf16 --reference "$REF" --out "$WORK/parity_bf16_4gpu.json" \
      $ACC $NVME
    run_case parity_bf16_2gpu 200 2 $MG parity --precision bf16 --reference "$REF" --out "$WORK/parity_bf16_2gpu.json" \
      $ACC $NVME
    ;;
  throughput)
    run_case throughput_ours 270 4 $MG throughput --out "$WORK/throughput_ours.json" $ACC $THR \
      --variants dp,zero1,zero2,zero3,tp1d,tp1d_nosp
    run_case throughput_1gpu 90 0 $MG throughput --out "$WORK/throughput_1gpu.json" $ACC $THR --variants dp
    run_case throughput_peers 240 4 $MG throughput --out "$WORK/throughput_peers.json" $ACC $THR \
      --variants lightning_ddp,lightning_fsdp,lightning_fsdp2,dtensor_tp
    ;;
  throughput7b)
    run_case throughput7b_ours 270 4 $MG throughput --out "$WORK/throughput7b_ours.json" $ACC $THR7 \
      --variants zero3,tp1d,pipeline
    run_case throughput7b_peers 240 4 $MG throughput --out "$WORK/throughput7b_peers.json" $ACC $THR7 \
      --variants lightning_fsdp2,dtensor_tp,lightning_ddp   # ddp last: expected OOM (fp32 Adam of 6.7B > 80 GB)
    ;;
  reduce)
    # ZeRO with gradients reduced in bf16 (reduce_dtype="compute") beside Lightning's fsdp, which reduces in bf16
    # under bf16-mixed; host syncs of dp and Lightning's ddp counted with the same callback.
    run_case reduce_1b3 200 4 $MG throughput --out "$WORK/reduce_1b3.json" $ACC $THR \
      --variants dp,lightning_ddp,zero2_bf16_reduce,zero3_bf16_reduce
    run_case reduce_7b 240 4 $MG throughput --out "$WORK/reduce_7b.json" $ACC $THR7 \
      --variants zero2_bf16_reduce,zero3_bf16_reduce,lightning_fsdp
    ;;
  dp_tuning)  # dp's scaling: bucket sizes, and NCCL limited to fewer SMs (it competes with backward for them)
    run_case dp_buckets 200 4 $MG throughput --out "$WORK/dp_buckets.json" $ACC $THR \
      --variants dp,dp_bucket100,dp_bucket250,lightning_ddp
    NCCL_MAX_CTAS=16 run_case dp_ctas16 120 4 $MG throughput --out "$WORK/dp_ctas16.json" $ACC $THR \
      --variants dp,dp_bucket100
    NCCL_MAX_CTAS=8 run_case dp_ctas8 120 4 $MG throughput --out "$WORK/dp_ctas8.json" $ACC $THR \
      --variants dp,dp_bucket100
    run_case dp_1gpu 90 0 $MG throughput --out "$WORK/dp_1gpu.json" $ACC $THR --variants dp
    ;;
  round2)  # after the first round: dp tuning, pipelines, tp1d and zero3's chunk size at ~6.7B, one call
    run_case dp_buckets 200 4 $MG throughput --out "$WORK/dp_buckets.json" $ACC $THR \
      --variants dp,dp_bucket100,lightning_ddp
    NCCL_MAX_CTAS=16 run_case dp_ctas16 120 4 $MG throughput --out "$WORK/dp_ctas16.json" $ACC $THR --variants dp
    NCCL_MAX_CTAS=8 run_case dp_ctas8 120 4 $MG throughput --out "$WORK/dp_ctas8.json" $ACC $THR --variants dp
    run_case tp1d_1b3 120 4 $MG throughput --out "$WORK/tp1d_1b3.json" $ACC $THR --variants tp1d,zero2
    run_case zero3_chunks_7b 150 4 $MG throughput --out "$WORK/zero3_chunks_7b.json" $ACC $THR7 \
      --variants zero3_bf16_reduce,zero3_bf16_chunk128m
    run_case pipeline_peer_4gpu 200 4 benchmarks/pipeline_peer.py --out "$WORK/pipeline_4gpu.json" $ACC $THR
    ;;
  round3)  # ZeRO's chunk size at 1.3B and ~6.7B, and the pipelines again
    run_case chunks_1b3 150 4 $MG throughput --out "$WORK/chunks_1b3.json" $ACC $THR \
      --variants zero3_bf16_reduce,zero3_bf16_chunk64m,zero3_bf16_chunk128m,zero2_bf16_reduce,zero2_bf16_chunk64m
    run_case chunks_7b 200 4 $MG throughput --out "$WORK/chunks_7b.json" $ACC $THR7 \
      --variants zero3_bf16_chunk64m,zero3_bf16_chunk256m,zero2_bf16_chunk128m,zero3_bf16_chunk128m
    run_case pipeline_peer_4gpu 200 4 benchmarks/pipeline_peer.py --out "$WORK/pipeline_4gpu.json" $ACC $THR
    ;;
  zero7b)  # ZeRO at ~6.7B beside both peers, fp32 and bf16 gradient reduction
    run_case zero7b_ours 300 4 $MG throughput --out "$WORK/zero7b_ours.json" $ACC $THR7 \
      --variants zero2,zero3,zero2_bf16_reduce,zero3_bf16_reduce
    run_case zero7b_peers 200 4 $MG throughput --out "$WORK/zero7b_peers.json" $ACC $THR7 \
      --variants lightning_fsdp,lightning_fsdp2
    ;;
  offload)
    run_case offload_2gpu 480 2 $MG throughput --out "$WORK/offload_2gpu.json" $ACC $THR \
      --variants zero3,zero3_offload,lightning_fsdp2
    ;;
  offload_2gpu)  # 2 GPUs: ZeRO-3 with every chunk on the host, and with part of its optimizer state spilled to NVMe,
    # beside FSDP2 + CPUOffloadPolicy (1.3 B; the plan of zero3_offload keeps everything on the GPU at this size)
    run_case offload_host_2gpu 480 2 $MG throughput --out "$WORK/offload_host_2gpu.json" $ACC $THR \
      --variants zero3,zero3_host,zero3_nvme_spill,lightning_fsdp2_offload
    ;;
  zero7b_tp1d_profile)  # 4 GPUs: ZeRO at ~6.7 B beside both peers again (last run at 1728d87), then tp1d under the
    # profiler at 1.3 B (where its last ~2% to 0.75x zero2 goes): ~8 min
    run_case zero7b_ours 300 4 $MG throughput --out "$WORK/zero7b_ours.json" $ACC $THR7 --variants zero2,zero3
    run_case zero7b_peers 200 4 $MG throughput --out "$WORK/zero7b_peers.json" $ACC $THR7 \
      --variants lightning_fsdp,lightning_fsdp2
    run_case profile_tp1d 150 4 benchmarks/profile_variant.py --variant tp1d --out "$OUT/profile_tp1d" $ACC $THR
    ;;
  zero_vs_fsdp)  # 4 GPUs: zero2/zero3 (fp32 and bf16 gradient reduction) beside Lightning fsdp and FSDP2 at ~6.7 B
    # (peers first this time, the reverse of zero7b_tp1d_profile's order) and at 1.3 B: ~5 min
    run_case zero7b_peers 200 4 $MG throughput --out "$WORK/zero7b_peers.json" $ACC $THR7 \
      --variants lightning_fsdp2,lightning_fsdp
    run_case zero7b_ours 300 4 $MG throughput --out "$WORK/zero7b_ours.json" $ACC $THR7 \
      --variants zero3,zero2,zero3_bf16_reduce,zero2_bf16_reduce
    run_case zero1b3_all 240 4 $MG throughput --out "$WORK/zero1b3_all.json" $ACC $THR \
      --variants lightning_fsdp,zero2,zero3,lightning_fsdp2,zero3_bf16_reduce
    ;;
  pipeline)
    run_case pipeline_peer_4gpu 500 4 benchmarks/pipeline_peer.py --out "$WORK/pipeline_4gpu.json" $ACC $THR
    ;;
  profile)  # where the step time goes (torch.profiler, benchmarks/profile_variant.py): tp1d, dp, zero3 at 1.3B
    for v in tp1d dp zero3; do
      run_case "profile_$v" 150 4 benchmarks/profile_variant.py --variant $v --out "$OUT/profile_$v" $ACC $THR
    done
    ;;
  two_gpu)  # a 2-GPU machine (nvidia-h100-x2): every strategy's parity at 2 GPUs, then tp1d beside zero2 and the
    # DTensor peer at tensor 2, and a profile of tp1d
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR
    run_case parity_2gpu_all 150 2 $MG parity --reference "$REF" --out "$WORK/parity_2gpu.json" $ACC $NVME
    run_case throughput_2gpu 240 2 $MG throughput --out "$WORK/throughput_2gpu.json" $ACC $THR \
      --variants tp1d,zero2,dtensor_tp
    run_case profile_tp1d_2gpu 150 2 benchmarks/profile_variant.py --variant tp1d --out "$OUT/profile_tp1d_2gpu" \
      $ACC $THR
    ;;
  two_gpu_speed)  # 2 GPUs: dp's scaling (1 GPU, then 2 beside Lightning ddp), tp1d beside zero2 and DTensor TP, profile
    run_case dp_1gpu 90 0 $MG throughput --out "$WORK/dp_1gpu.json" $ACC $THR --variants dp
    run_case speed_2gpu 300 2 $MG throughput --out "$WORK/speed_2gpu.json" $ACC $THR \
      --variants dp,lightning_ddp,tp1d,tp1d_chunks2,tp1d_chunks4,zero2
    run_case profile_tp1d_2gpu 150 2 benchmarks/profile_variant.py --variant tp1d --out "$OUT/profile_tp1d_2gpu" \
      $ACC $THR
    ;;
  four_gpu)  # one 4-GPU call: tp1d's overlap chunks beside zero2 and DTensor TP, dp's scaling, pipelines on equal stages
    run_case tp1d_4gpu 200 4 $MG throughput --out "$WORK/tp1d_4gpu.json" $ACC $THR \
      --variants tp1d,tp1d_chunks2,tp1d_chunks4,zero2,dtensor_tp
    run_case dp_4gpu 150 4 $MG throughput --out "$WORK/dp_4gpu.json" $ACC $THR --variants dp,lightning_ddp
    run_case dp_1gpu 90 0 $MG throughput --out "$WORK/dp_1gpu.json" $ACC $THR --variants dp
    run_case pipeline_equal_4gpu 200 4 benchmarks/pipeline_peer.py --out "$WORK/pipeline_equal_4gpu.json" $ACC $THR \
      --vocab 2048
    ;;
  hybrid_parity)  # hybrid's compositions against one process (fp32, clipping by norm), 4 GPUs then 2: ~3 min
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR --clip 0.05
    run_case parity_hybrid_4gpu 200 4 $MG parity --reference "$REF" --out "$WORK/parity_hybrid_4gpu.json" $ACC \
      --only dp,tp1d_2way,pipeline_1f1b_2stages,hybrid,hybrid_t2_zero1,hybrid_t2_zero2,hybrid_t2_zero3,hybrid_p2_t2,\
hybrid_p2_zero1
    run_case parity_hybrid_2gpu 120 2 $MG parity --reference "$REF" --out "$WORK/parity_hybrid_2gpu.json" $ACC \
      --only hybrid,hybrid_t2_zero2,hybrid_t2_zero3
    ;;
  tp2d)  # 2D tensor parallelism (issue 14): parity at 4 GPUs (a 2 x 2 grid) and 2, then tp2d beside tp1d (tensor 4) and
    # zero2 at 1.3B, each with its per-GPU peak memory: ~4 min
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR --clip 0.05
    run_case parity_tp2d_4gpu 150 4 $MG parity --reference "$REF" --out "$WORK/parity_tp2d_4gpu.json" $ACC \
      --only dp,tp1d,tp2d
    run_case parity_tp2d_2gpu 120 2 $MG parity --reference "$REF" --out "$WORK/parity_tp2d_2gpu.json" $ACC --only tp2d
    run_case tp2d_speed 300 4 $MG throughput --out "$WORK/tp2d_speed.json" $ACC $THR --variants tp2d,tp1d,zero2,tp2d
    ;;
  tp2d_check)  # tp2d and tp2.5d on NCCL at 4 GPUs (2.5D: 2 and 4 layers of 1 x 1 grids, the depth's groups) and a
    # checkpoint chain through tp2d: ~3 min
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR --clip 0.05
    run_case parity_tp2_4gpu 150 4 $MG parity --reference "$REF" --out "$WORK/parity_tp2_4gpu.json" $ACC \
      --only ddp,tp2d,tp2p5d,tp2p5d_d4
    run_case resume_tp2d_4gpu 240 4 $MG resume $ACC $PAR $NVME --dir "$WORK/ckpts" \
      --legs zero3,tp2d,tp1d_2way,tp2d,pipeline_1f1b_2stages,tp2p5d,tp2d,dp
    ;;
  grid_check)  # after the grid layers' shared cut (GridCut) and tp3d: the grid modes on NCCL with clipping (fp32) at
    # 4 and 2 GPUs, bf16-mixed at 4 (tp3d below 8 GPUs is a 1 x 1 x 1 cube beside data parallelism), and a
    # checkpoint chain through them: ~4 min
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR --clip 0.05
    run_case parity_grid_4gpu 150 4 $MG parity --reference "$REF" --out "$WORK/parity_grid_4gpu.json" $ACC \
      --only ddp,tp2d,tp2p5d,tp2p5d_d4,tp3d,hybrid
    run_case parity_grid_2gpu 120 2 $MG parity --reference "$REF" --out "$WORK/parity_grid_2gpu.json" $ACC \
      --only ddp,tp2d,tp2p5d,tp3d
    run_case parity_grid_bf16_4gpu 150 4 $MG parity --precision bf16 --reference "$REF" \
      --out "$WORK/parity_grid_bf16_4gpu.json" $ACC --only ddp,tp2d,tp2p5d,tp3d
    run_case resume_grid_4gpu 240 4 $MG resume $ACC $PAR $NVME --dir "$WORK/ckpts" --legs zero3,tp2d,tp3d,tp2p5d,dp
    ;;
  checkpoints)  # the one checkpoint path (issue 13): a chain of strategies at 4 GPUs, each resuming the previous one's
    # checkpoint for one more epoch, continued at 2 GPUs from the 4-GPU chain's last checkpoint; against one
    # uninterrupted ddp run (fp32, SGD, 1e-5): ~2 min
    run_case resume_4gpu 240 4 $MG resume $ACC $PAR $NVME --dir "$WORK/ckpts" \
      --legs zero3,hybrid_p2_t2,tp1d_2way,pipeline_1f1b_2stages,hybrid_t2_zero2,hybrid_p2_zero1,pipeline_interleaved
    run_case resume_2gpu 200 2 $MG resume $ACC $PAR $NVME --dir "$WORK/ckpts" --epochs-before 7 \
      --resume-from "$WORK/ckpts/epoch6_pipeline_interleaved_w4.ckpt" --legs hybrid,zero2_offload,pipeline_1f1b,zero3_nvme,tp1d,dp
    ;;
  checkpoint_speed)  # one save during fit at 1.3 B (time, GPU / host memory rise, bytes) per strategy whose path
    # changed, at this checkout, or with BASE=<another checkout holding benchmarks/checkpoint_speed.py> at that one: ~4 min
    dir=${BASE:-$PWD}
    (cd "$dir" && PYTHONPATH=$dir run_case "ckpt_speed_$(basename "$dir")" 500 4 benchmarks/checkpoint_speed.py \
      $ACC $THR --warmup 1 --steps 1 --variants tp1d,pipeline_2stages,hybrid_p2_t2,zero3 --dir "$WORK/ck")
    ;;
  hybrid_speed)  # hybrid at 4 GPUs beside the single methods on the same 1.3B model, one run: ~8 min
    run_case hybrid_4gpu 540 4 $MG throughput --out "$WORK/hybrid_4gpu.json" $ACC $THR \
      --variants dp,zero2,tp1d_2way,pipeline_2stages,hybrid_d2_t2,hybrid_d2_t2_zero2,hybrid_d2_t2_zero3,hybrid_p2_t2
    ;;
  tp1d_check)  # tp1d (now hybrid's preset) and hybrid: parity with clipping at 4 GPUs, then tp1d beside zero2: ~3 min
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR --clip 0.05
    run_case parity_tp_4gpu 150 4 $MG parity --reference "$REF" --out "$WORK/parity_tp_4gpu.json" $ACC \
      --only tp1d,tp1d_sp,tp1d_2way,hybrid,hybrid_t2_zero2,hybrid_p2_t2,hybrid_p2_zero1
    run_case tp1d_speed_4gpu 200 4 $MG throughput --out "$WORK/tp1d_speed_4gpu.json" $ACC $THR --variants tp1d,zero2,hybrid_p2_t2_m4
    ;;
  hybrid_mb)  # pipeline 2 x tensor 2 with fewer, larger microbatches and without sequence parallelism: ~2 min
    run_case hybrid_mb_4gpu 300 4 $MG throughput --out "$WORK/hybrid_mb_4gpu.json" $ACC $THR \
      --variants pipeline_2stages,hybrid_p2_t2,hybrid_p2_t2_m4,hybrid_p2_t2_m2,hybrid_p2_t2_nosp
    ;;
  hybrid_nodes)  # hybrid's groups across two "nodes" (2 torchrun agents x 2 GPUs): tensor inside a node, data or
    # pipeline across; then where pipeline 2 x tensor 2 loses against pipeline 2 x data 2 (profiles): ~5 min
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR --clip 0.05
    cpu_flag=""; [ "$CPU" = 1 ] && cpu_flag="--cpu"
    run_case parity_hybrid_two_nodes 150 0 benchmarks/two_nodes.py --nproc 2 $cpu_flag -- $MG parity --reference "$REF" \
      --out "$WORK/parity_hybrid_two_nodes.json" $ACC --only zero3,hybrid_t2_zero2,hybrid_t2_zero3,hybrid_p2_t2
    for v in hybrid_p2_t2 pipeline_2stages; do
      run_case "profile_$v" 150 4 benchmarks/profile_variant.py --variant $v --out "$OUT/profile_$v" $ACC $THR
    done
    ;;
  final_speed)  # the issue's tp1d and dp figures in one 4-GPU call (run `parity` first, and `pipeline_fair` for the
    # pipelines, each in its own call): ~5 min
    [ "$CPU" = 1 ] || run_case sync_check 60 0 $MG sync_check
    run_case tp1d_4gpu 200 4 $MG throughput --out "$WORK/tp1d_4gpu.json" $ACC $THR \
      --variants tp1d,tp1d_nodefer,zero2,dtensor_tp
    run_case dp_4gpu 180 4 $MG throughput --out "$WORK/dp_4gpu.json" $ACC $THR --variants dp,lightning_ddp,dp_bf16_reduce
    run_case dp_1gpu 90 0 $MG throughput --out "$WORK/dp_1gpu.json" $ACC $THR --variants dp
    ;;
  check_2gpu)  # 2 GPUs: every strategy's parity (fp32, bf16-mixed), then dp's scaling with and without bf16 reduction
    [ "$CPU" = 1 ] || run_case sync_check 60 0 $MG sync_check
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR
    run_case parity_2gpu_all 150 2 $MG parity --reference "$REF" --out "$WORK/parity_2gpu.json" $ACC $NVME
    run_case parity_bf16_2gpu 200 2 $MG parity --precision bf16 --reference "$REF" --out "$WORK/parity_bf16_2gpu.json" \
      $ACC $NVME
    run_case dp_2gpu 200 2 $MG throughput --out "$WORK/dp_2gpu.json" $ACC $THR \
      --variants dp,lightning_ddp,dp_bf16_reduce,dp_bf16_reduce,dp
    run_case dp_1gpu 90 0 $MG throughput --out "$WORK/dp_1gpu.json" $ACC $THR --variants dp
    ;;
  idle_dp)  # where dp's scaling goes: dp under the profiler at 1 GPU and at 2, Lightning ddp at 2 (with what the
    # host was doing in each GPU idle gap)
    run_case profile_dp_1gpu 120 0 benchmarks/profile_variant.py --variant dp --out "$OUT/profile_dp_1gpu" $ACC $THR
    run_case profile_dp_2gpu 120 2 benchmarks/profile_variant.py --variant dp --out "$OUT/profile_dp_2gpu" $ACC $THR
    run_case profile_ddp_2gpu 120 2 benchmarks/profile_variant.py --variant lightning_ddp --out "$OUT/profile_ddp_2gpu" \
      $ACC $THR
    ;;
  tp1d_4gpu)  # tp1d beside zero2 and DTensor TP at 4 GPUs; then at batch 8/GPU (fixed per-step costs weigh half)
    run_case tp1d_4gpu 200 4 $MG throughput --out "$WORK/tp1d_4gpu.json" $ACC $THR \
      --variants tp1d,tp1d_nodefer,zero2,dtensor_tp,tp1d
    run_case tp1d_4gpu_batch8 150 4 $MG throughput --out "$WORK/tp1d_4gpu_batch8.json" $ACC $THR --batch 8 \
      --variants tp1d,tp1d_chunks2,zero2
    ;;
  tp1d_2gpu)  # tp1d with and without deferred weight gradients beside zero2, 2 GPUs
    run_case tp1d_2gpu 200 2 $MG throughput --out "$WORK/tp1d_2gpu.json" $ACC $THR \
      --variants tp1d,tp1d_nodefer,zero2,tp1d,tp1d_nodefer
    ;;
  pipeline_2gpu)  # pipelines on equal stages at 2 GPUs beside torch, and our 1F1B and zero bubble under the profiler
    run_case pipeline_equal_2gpu 200 2 benchmarks/pipeline_peer.py --out "$WORK/pipeline_equal_2gpu.json" $ACC $THR \
      --vocab 2048 --torch-schedules 1f1b,zero_bubble --variants pipeline,pipeline_zero_bubble
    for v in pipeline pipeline_zero_bubble; do
      run_case "profile_$v" 120 2 benchmarks/profile_variant.py --variant $v --out "$OUT/profile_$v" $ACC $THR \
        --vocab 2048
    done
    ;;
  parity_pipeline_2gpu)  # 2 GPUs: every strategy's parity, then the pipelines on equal stages beside torch and our zero
    # bubble profiled (a 2-GPU machine's whole check of the pipeline's changes)
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR
    run_case parity_2gpu_all 150 2 $MG parity --reference "$REF" --out "$WORK/parity_2gpu.json" $ACC $NVME
    run_case pipeline_equal_2gpu 240 2 benchmarks/pipeline_peer.py --out "$WORK/pipeline_equal_2gpu.json" $ACC $THR \
      --vocab 2048
    run_case profile_pipeline_zero_bubble 120 2 benchmarks/profile_variant.py --variant pipeline_zero_bubble \
      --out "$OUT/profile_pipeline_zero_bubble" $ACC $THR --vocab 2048
    ;;
  zero_bubble_2gpu)  # 2 GPUs: parity (fp32 and bf16-mixed), then 1F1B and zero bubble on equal stages beside torch
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR
    run_case parity_2gpu_all 150 2 $MG parity --reference "$REF" --out "$WORK/parity_2gpu.json" $ACC $NVME
    run_case parity_bf16_2gpu 200 2 $MG parity --precision bf16 --reference "$REF" --out "$WORK/parity_bf16_2gpu.json" \
      $ACC $NVME
    run_case pipeline_equal_2gpu 200 2 benchmarks/pipeline_peer.py --out "$WORK/pipeline_equal_2gpu.json" $ACC $THR \
      --vocab 2048 --torch-schedules 1f1b,zero_bubble --variants pipeline,pipeline_zero_bubble
    ;;
  collective_matmul)  # tp1d's forward collectives beside torch's symmetric-memory collective matmul, 2 (and 4) GPUs
    run_case collective_matmul_2gpu 120 2 benchmarks/collective_matmul_probe.py --out "$OUT/collective_matmul_2gpu.json"
    if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 4 ]; then
      run_case collective_matmul_4gpu 120 4 benchmarks/collective_matmul_probe.py --out "$OUT/collective_matmul_4gpu.json"
    fi
    ;;
  deferred_2gpu)  # 2 GPUs: the fused accumulation, parity (fp32, bf16), pipelines with deferred weight gradients
    run_case fused_accumulate 60 0 benchmarks/fused_accumulate_check.py
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR
    run_case parity_2gpu_all 150 2 $MG parity --reference "$REF" --out "$WORK/parity_2gpu.json" $ACC $NVME
    run_case parity_bf16_2gpu 200 2 $MG parity --precision bf16 --reference "$REF" --out "$WORK/parity_bf16_2gpu.json" \
      $ACC $NVME
    run_case pipeline_equal_2gpu 240 2 benchmarks/pipeline_peer.py --out "$WORK/pipeline_equal_2gpu.json" $ACC $THR \
      --vocab 2048 --torch-schedules 1f1b,interleaved \
      --variants pipeline,pipeline_deferred,pipeline_interleaved,pipeline_interleaved_deferred,pipeline_zero_bubble
    ;;
  profile_1f1b_2gpu)  # 2 GPUs: our 1F1B and torch's Schedule1F1B under the profiler, equal stages (where ours loses)
    run_case profile_pipeline 120 2 benchmarks/profile_variant.py --variant pipeline --out "$OUT/profile_pipeline" \
      $ACC $THR --vocab 2048
    run_case profile_torch_1f1b 120 2 benchmarks/pipeline_peer.py --torch-schedules 1f1b --variants none \
      --profile "$OUT/profile_torch" $ACC $THR --vocab 2048
    ;;
  casts_2gpu)  # 2 GPUs: parity (fp32, bf16), then every pipeline schedule beside torch's on equal stages
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR
    run_case parity_2gpu_all 150 2 $MG parity --reference "$REF" --out "$WORK/parity_2gpu.json" $ACC $NVME
    run_case parity_bf16_2gpu 200 2 $MG parity --precision bf16 --reference "$REF" --out "$WORK/parity_bf16_2gpu.json" \
      $ACC $NVME
    run_case pipeline_equal_2gpu 240 2 benchmarks/pipeline_peer.py --out "$WORK/pipeline_equal_2gpu.json" $ACC $THR \
      --vocab 2048 --variants pipeline,pipeline_interleaved,pipeline_zero_bubble,pipeline_deferred,pipeline
    ;;
  pipeline_fair)  # ours and torch's three schedules on equal stages, one variant per process, two rounds in
    # alternating order (a process's later variants run slower, so a shared process biases the ratios): ~6 min at 4 GPUs
    n=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$CPU" = 1 ] && n=2; [ "$n" -ge 4 ] && n=4
    for round in 1 2; do
      for kind in 1f1b interleaved zero_bubble; do
        ours=pipeline; [ $kind != 1f1b ] && ours=pipeline_$kind
        pair="torch ours"; [ $round = 2 ] && pair="ours torch"
        for side in $pair; do
          if [ $side = torch ]; then args="--torch-schedules $kind --variants none"; else args="--torch-schedules= --variants $ours"; fi
          run_case "fair_${round}_${side}_$kind" 100 "$n" benchmarks/pipeline_peer.py --out "$WORK/fair_${round}_${side}_$kind.json" \
            $ACC $THR --vocab 2048 $args
        done
      done
    done
    $PY benchmarks/pipeline_fair_summary.py "$WORK"/fair_*.json | tee -a "$LOG"
    ;;
  eight_gpu_parity)  # issue 15: every strategy's parity with clipping at 8 GPUs against one process, then the grid
    # modes and hybrid 2 x 2 x 2 under bf16-mixed, and a checkpoint chain through them at 8: ~4-5 min. The model is
    # sized for 8 ranks: 16 blocks (interleaved: 8 stages x 2 chunks), 8 heads (tp1d and hybrid then take tensor 8;
    # with 4 heads their plan falls back to tensor 4 after the harness planned the batch for 8), 8 microbatches
    # (interleaved, zero bubble and chimera want a multiple of the 8 stages) of a global batch of 32 (so that
    # data 4 x 2 stages still has 8 samples a replica to cut).
    P8="--layers 16 --heads 8 --microbatches 8 --global-batch 32"
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR $P8 --clip 0.05
    run_case parity_clip_8gpu 210 8 $MG parity --reference "$REF" --out "$WORK/parity_clip_8gpu.json" $ACC $NVME
    run_case parity_grid_bf16_8gpu 120 8 $MG parity --precision bf16 --reference "$REF" \
      --out "$WORK/parity_grid_bf16_8gpu.json" $ACC \
      --only ddp,tp2d,tp2p5d_q2_d2,tp2p5d_d4,tp3d_q2,hybrid_p2_t2,hybrid_d2_p2_t2_zero1
    run_case resume_grid_8gpu 150 8 $MG resume $ACC $PAR $P8 $NVME --dir "$WORK/ckpts" \
      --legs zero3,tp2d,tp3d_q2,tp2p5d_q2_d2,hybrid_d2_p2_t2_zero1,pipeline_interleaved,dp
    ;;
  eight_gpu_speed)  # issue 15 at 1.3B on 8 GPUs: ours (dp, zero1-3, pipeline at 8 stages, hybrid as data 2 x
    # pipeline 2 x tensor 2 and as data 4 x tensor 2 with ZeRO-2, tp1d at tensor 8), then the peers, each with its
    # per-GPU peak; then zero2 alone at 1 GPU and at 8, one process each (the scaling figure's two ends): ~5 min.
    # tp1d last: never run at tensor 8, and a variant that leaves one rank early hangs the rest of its process.
    [ "$CPU" = 1 ] || run_case sync_check 60 0 $MG sync_check
    run_case speed_8gpu_ours 200 8 $MG throughput --out "$WORK/speed_8gpu_ours.json" $ACC $THR $THR8 \
      --variants dp,zero1,zero2,zero3,pipeline,hybrid_p2_t2,hybrid_d2_t2_zero2,tp1d
    run_case speed_8gpu_peers 150 8 $MG throughput --out "$WORK/speed_8gpu_peers.json" $ACC $THR $THR8 \
      --variants lightning_ddp,lightning_fsdp,lightning_fsdp2,dtensor_tp
    run_case zero2_1gpu 60 0 $MG throughput --out "$WORK/zero2_1gpu.json" $ACC $THR $THR8 --variants zero2
    run_case zero2_8gpu 60 8 $MG throughput --out "$WORK/zero2_8gpu.json" $ACC $THR $THR8 --variants zero2
    scaling zero2 "$WORK/zero2_1gpu.json" "$WORK/zero2_8gpu.json"
    ;;
  eight_gpu_7b)  # issue 15 at ~6.7B on 8 GPUs (batch 2/GPU): ZeRO and dp, the peers, the tensor-parallel ones, then
    # our 1F1B and interleaved beside torch's at 8 stages (16 microbatches: 2 a stage, our pipeline's default; the
    # 1.3B pair of these is eight_gpu_pipeline): ~6 min. Last in their process, as they may run out of memory on
    # 80 GB cards: zero1 (fp32 weights and gradients whole, 54 GB), dp and ddp (Adam's fp32 state whole too, 107 GB).
    # tp1d last in its own: at ~6.7B (4 GPUs) it once left one rank early and hung its process to the time limit.
    run_case speed7b_8gpu_zero 130 8 $MG throughput --out "$WORK/speed7b_8gpu_zero.json" $ACC $THR7 $THR8 \
      --variants zero3,zero2,zero1,dp
    run_case speed7b_8gpu_peers 120 8 $MG throughput --out "$WORK/speed7b_8gpu_peers.json" $ACC $THR7 $THR8 \
      --variants lightning_fsdp2,lightning_fsdp,dtensor_tp,lightning_ddp
    run_case speed7b_8gpu_tensor 140 8 $MG throughput --out "$WORK/speed7b_8gpu_tensor.json" $ACC $THR7 $THR8 \
      --variants hybrid_p2_t2,hybrid_d2_t2_zero2,tp1d
    run_case pipeline7b_8gpu 130 8 benchmarks/pipeline_peer.py --out "$WORK/pipeline7b_8gpu.json" $ACC $THR7 $THR8 \
      --microbatches 16 --torch-schedules 1f1b,interleaved --variants pipeline,pipeline_interleaved
    ;;
  eight_gpu_pipeline)  # issue 15: our 1F1B and interleaved at 8 stages beside torch's (Schedule1F1B,
    # ScheduleInterleaved1F1B) on equal stages (1.3B, a 2048-token vocabulary), one variant per process, two rounds
    # in alternating order, as pipeline_fair; 16 microbatches (2 a stage, our pipeline's default: with 8, 1F1B's
    # bubble would be 7 of its 15 slots): ~4-5 min
    for round in 1 2; do
      for kind in 1f1b interleaved; do
        ours=pipeline; [ $kind != 1f1b ] && ours=pipeline_$kind
        pair="torch ours"; [ $round = 2 ] && pair="ours torch"
        for side in $pair; do
          if [ $side = torch ]; then args="--torch-schedules $kind --variants none"; else args="--torch-schedules= --variants $ours"; fi
          run_case "fair8_${round}_${side}_$kind" 60 8 benchmarks/pipeline_peer.py \
            --out "$WORK/fair_${round}_${side}_$kind.json" $ACC $THR $THR8 --vocab 2048 --microbatches 16 $args
        done
      done
    done
    $PY benchmarks/pipeline_fair_summary.py "$WORK"/fair_*.json | tee -a "$LOG"
    ;;
  dp_grouped)  # 4 GPUs (or 2): dp's grouped in-place all-reduce (its default) against its flat buckets: parity, then
    # throughput in alternating order beside Lightning ddp, and dp at one GPU: ~5 min
    n=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$CPU" = 1 ] && n=2; [ "$n" -ge 4 ] && n=4
    [ "$CPU" = 1 ] || run_case sync_check 60 0 $MG sync_check
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR
    run_case parity_dp_grouped 90 "$n" $MG parity --reference "$REF" --out "$WORK/parity_dp_grouped.json" $ACC \
      --only dp,dp_flat
    run_case dp_grouped_speed 240 "$n" $MG throughput --out "$WORK/dp_grouped_speed.json" $ACC $THR \
      --variants dp_flat,dp,lightning_ddp,dp,dp_flat
    run_case dp_1gpu 90 0 $MG throughput --out "$WORK/dp_1gpu.json" $ACC $THR --variants dp
    ;;
  pipeline_ab)  # 2 GPUs: pipeline parity (fp32, bf16), then our 1F1B at this checkout and at BASE (another checkout of
    # the repo) beside torch's, one variant per process, two rounds in alternating order; interleaved beside torch
    run_case reference 45 0 $MG reference --out "$REF" $ACC $PAR
    pipes=pipeline_1f1b,pipeline_gpipe,pipeline_interleaved,pipeline_zero_bubble,pipeline_chimera,pipeline_1f1b_deferred
    run_case parity_pipeline 100 2 $MG parity --reference "$REF" --out "$WORK/parity_pipeline.json" $ACC --only $pipes
    run_case parity_pipeline_bf16 100 2 $MG parity --precision bf16 --reference "$REF" \
      --out "$WORK/parity_pipeline_bf16.json" $ACC --only dp,$pipes
    for round in 1 2; do
      order="torch ours base"; [ $round = 2 ] && order="base ours torch"
      for side in $order; do
        case $side in
          torch) run_case "ab_${round}_torch_1f1b" 100 2 benchmarks/pipeline_peer.py --out "$OUT/fair_${round}_torch_1f1b.json" \
                   $ACC $THR --vocab 2048 --torch-schedules 1f1b --variants none ;;
          ours) run_case "ab_${round}_ours_1f1b" 100 2 benchmarks/pipeline_peer.py --out "$OUT/fair_${round}_ours_1f1b.json" \
                  $ACC $THR --vocab 2048 --torch-schedules= --variants pipeline ;;
          base) (cd "${BASE:?set BASE to another checkout}" && PYTHONPATH=$PWD run_case "ab_${round}_base_1f1b" 100 2 \
                  benchmarks/pipeline_peer.py --out "$OUT/base_${round}_ours_1f1b.json" $ACC $THR --vocab 2048 \
                  --torch-schedules= --variants pipeline) ;;
        esac
      done
      pair="torch ours"; [ $round = 2 ] && pair="ours torch"
      for side in $pair; do
        if [ $side = torch ]; then args="--torch-schedules interleaved --variants none"; else args="--torch-schedules= --variants pipeline_interleaved"; fi
        run_case "ab_${round}_${side}_interleaved" 100 2 benchmarks/pipeline_peer.py \
          --out "$OUT/fair_${round}_${side}_interleaved.json" $ACC $THR --vocab 2048 $args
      done
    done
    echo "--- this checkout" | tee -a "$LOG"
    $PY benchmarks/pipeline_fair_summary.py "$OUT"/fair_*.json | tee -a "$LOG"
    echo "--- BASE (1F1B)" | tee -a "$LOG"
    $PY benchmarks/pipeline_fair_summary.py "$OUT"/fair_*_torch_1f1b.json "$OUT"/base_*.json | tee -a "$LOG"
    ;;
  nccl_ctas)  # tp1d's collectives are exposed: does NCCL with more CTAs (channels) move them faster? 2 GPUs
    run_case ctas_default 120 2 $MG throughput --out "$WORK/ctas_default.json" $ACC $THR --variants tp1d
    NCCL_MIN_CTAS=32 run_case ctas_min32 120 2 $MG throughput --out "$WORK/ctas_min32.json" $ACC $THR --variants tp1d
    NCCL_MIN_CTAS=32 NCCL_MAX_CTAS=32 NCCL_PROTO=Simple run_case ctas_32_simple 120 2 $MG throughput \
      --out "$WORK/ctas_32_simple.json" $ACC $THR --variants tp1d
    ;;
  nccl_proto_4gpu)  # 4 GPUs: the profile shows tp1d's all-gathers and reduce-scatters on NCCL's LL protocol; do
    # Simple or LL128 move them faster? (2 GPUs: no, see nccl_ctas.) zero2 alongside as the control: ~4 min
    run_case proto_default 120 4 $MG throughput --out "$WORK/proto_default.json" $ACC $THR --variants tp1d,zero2
    NCCL_PROTO=Simple run_case proto_simple 120 4 $MG throughput --out "$WORK/proto_simple.json" $ACC $THR \
      --variants tp1d,zero2
    NCCL_PROTO=LL128 run_case proto_ll128 120 4 $MG throughput --out "$WORK/proto_ll128.json" $ACC $THR \
      --variants tp1d,zero2
    run_case proto_default2 120 4 $MG throughput --out "$WORK/proto_default2.json" $ACC $THR --variants tp1d,zero2
    ;;
  pipeline_equal)  # stages of equal time for the bubble formulas: a 2048-token vocabulary makes the head negligible
    run_case pipeline_equal_4gpu 500 4 benchmarks/pipeline_peer.py --out "$WORK/pipeline_equal_4gpu.json" $ACC $THR \
      --vocab 2048
    ;;
  selftest_hang)  # checks the timeout and the leftover kill: a case that never ends
    printf '%s\n' 'import os, subprocess, sys, time' \
      'if os.environ["RANK"] == "1":  # an orphan in its own session, as a stuck worker child would be' \
      '    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)' \
      'time.sleep(3600)' > "$WORK/hang.py"
    run_case hang 5 2 "$WORK/hang.py"
    ;;
  *)
    echo "unknown mode $MODE"; exit 2 ;;
esac

$PY - "$WORK" "$OUT/$MODE.json" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
out.write_text(json.dumps(merged, indent=1, default=str))
EOF
{
  echo "================ summary: $MODE ($([ "$CPU" = 1 ] && echo 'CPU, gloo' || echo GPU)), $(date +%T)"
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  grep -hE '^(parity|throughput|pipeline peer|reference)[: ]|^  [A-Za-z0-9_]+ +(PASS|FAIL|ok|oom|error) ' "${CASES[@]}" | cut -c1-220
} | tee "$OUT/${MODE}_summary.txt"
rm -rf "$WORK"
