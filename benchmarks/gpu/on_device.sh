#!/usr/bin/env bash
# Run ON THE DEVICE machine (the device tool's `run`, carry [".whl"]), from the repo root:
#     bash benchmarks/gpu/on_device.sh PHASE [PHASE...]
# A fresh machine is bare and goes back 30 s after a call, so every call installs the wheels again
# (seconds) and a call that benches builds the model first (`model`). Phases, in the order given:
#   tests     the CUDA tests: exactness of CUDA against CPU, graphs against eager, the engine on CUDA, VAD
#   model     /tmp/full.nemo: the full Nemotron 0.6b architecture, random weights, calibrated
#   step      one engine step by itself, fp32 and bf16 (benchmarks/engine_step.py)
#   bench     the loaded engine, fp32 then bf16, in-process client (monosemantic bench); BENCH_STREAMS
#             and BENCH_STREAMS_BF16 override the counts
#   baseline  side by side with NeMo's CacheAwareRNNTPipeline on the same model and workload
#   serve     the server under loadtest clients in another process (benchmarks/server_ingest.py)
#   alt       the bench again with each .whl/v_*/ tree first on PYTHONPATH, alternated with this one
# Logs and JSON land in $OUT (the device tool brings them back).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# SKIP_INSTALL=1 (with python3 a CPU venv holding everything) dry-runs the phases on a machine without a GPU,
# DEVICE=cpu MODEL=<small .nemo> BENCH_STREAMS=2.
if [ -z "${SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
run() { echo "+ $*" | tee -a "$OUT/commands.txt"; "$@"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || lscpu | head -15; } | tee "$OUT/machine.txt"
python3 -c "import torch, monosemantic; print('torch', torch.__version__, 'monosemantic', monosemantic.__file__)" | tee -a "$OUT/machine.txt"
MODEL=${MODEL:-/tmp/full.nemo}
DEVICE=${DEVICE:-cuda}
BENCH=(python3 -m monosemantic bench --model "$MODEL" --device "$DEVICE" --latency-ms 160 --max-streams 1536 --max-batch 512 --seconds 8)
for phase in "$@"; do
    case "$phase" in
    tests)
        run python3 -m pytest -q -p no:cacheprovider tests/streaming/test_cuda.py tests/streaming/test_cuda_graph.py \
            tests/engine/test_engine_cuda.py tests/vad/test_silero.py tests/engine/test_memory.py tests/models/test_precision.py \
            2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    model)
        [ -f "$MODEL" ] || run python3 benchmarks/make_model.py --arch full --out "$MODEL" 2>&1 | tail -3 ;;
    step)
        for dtype in float32 bfloat16; do
            run python3 benchmarks/engine_step.py --model "$MODEL" --device "$DEVICE" --audio noise --dtype "$dtype" --batch 64 256 512 1024 \
                2>&1 | tee -a "$OUT/step.log" | tail -6
        done ;;
    bench)
        run "${BENCH[@]}" --streams ${BENCH_STREAMS:-256 384 512} --json "$OUT/bench_fp32.json" 2>&1 | tee "$OUT/bench_fp32.log" | grep -v '^#'
        run "${BENCH[@]}" --dtype bfloat16 --streams ${BENCH_STREAMS_BF16:-512 768 1024} --json "$OUT/bench_bf16.json" 2>&1 | tee "$OUT/bench_bf16.log" | grep -v '^#' ;;
    baseline)
        run "${BENCH[@]}" --streams 32 64 128 --baseline nemo --json "$OUT/baseline.json" 2>&1 | tee "$OUT/baseline.log" | grep -v '^#' ;;
    serve)
        run python3 benchmarks/server_ingest.py --model "$MODEL" --device "$DEVICE" --max-batch 512 --latency-ms 160 --streams 192 \
            --seconds 20 --frame-ms 20 --coalesce both 2>&1 | tee "$OUT/serve.log" | tail -12 ;;
    alt)
        for tree in .whl/v_*/; do
            [ -d "$tree" ] || continue
            python3 -m pip install -q --no-index --no-deps --no-compile --target "/tmp/alt_$(basename "$tree")" "$tree"/*.whl || exit 1
            for round in 1 2; do
                echo "== round $round: this tree" | tee -a "$OUT/alt.log"
                run "${BENCH[@]}" --streams ${BENCH_STREAMS:-256 384} 2>&1 | tee -a "$OUT/alt.log" | grep -v '^#'
                echo "== round $round: $tree" | tee -a "$OUT/alt.log"
                PYTHONPATH="/tmp/alt_$(basename "$tree"):/tmp/site" run "${BENCH[@]}" --streams ${BENCH_STREAMS:-256 384} 2>&1 | tee -a "$OUT/alt.log" | grep -v '^#'
            done
        done ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
    esac
done
