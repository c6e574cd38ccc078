#!/usr/bin/env bash
# One command for a lent GPU (issues 14, 31): encoding speed against sentence-transformers at three model shapes,
# largest first (random weights: speed depends on the shape), `llm2emb encode` itself timed on the same documents,
# training steps against CachedMNRL (LoRA; QLoRA 4-bit at 7B), then the CUDA tests; every figure kept.
#
#   scripts/gpu_check.sh OUT [DATA]
#
# OUT receives four files (the device tool brings back at most eight): gpu_check.json (every benchmark's report),
# gpu_check.md (one table), test_cuda.txt (the test runs after the benchmarks: all but FSDP, then FSDP) and
# gpu_check.log.
# DATA holds scifact/ (corpus.jsonl; queries.jsonl and qrels/train.tsv, from which bench_train makes triplets of a
# claim, its abstract and another abstract: abstracts fill the GPU, where SNLI's short sentences left each training
# step bound by kernel launches on 2026-12-04) and tokenizer/ (SmolLM2's tokenizer.json and tokenizer_config.json);
# default .gpu-data, made by `scripts/gpu_check.sh --prepare` from ../shared/data and a converted SmolLM2 folder (it is
# git-ignored, about 12 MB, and must be named in the device tool's `carry`).
# Environment: GPU_CHECK_SHAPES (default "qwen2.5-7b qwen2.5-1.5b smollm2-135m", run in that order: 7B first),
# GPU_CHECK_TESTS (1: the CUDA tests after the shapes; 0 skips them), GPU_CHECK_DEVICE (default cuda;
# cpu with GPU_CHECK_SHAPES=tiny-llama checks the plumbing on a laptop), GPU_CHECK_LIMIT (documents encoded, 2000),
# GPU_CHECK_BUDGET (seconds, default 480): the script stops starting steps, and cuts a running one short, so that it
# ends inside that time with OUT complete. A command killed by the device tool's own limit brought nothing back
# (2026-12-04), so keep the budget about 60 s under the tool's timeout_s.
#
# On the lent H200 (docs/GPU.md says why each part is there):
#   scripts/gpu_check.sh --prepare runs/q/smol-bi && scripts/gpu_check.sh --wheels   # here, once
#   run(command="scripts/gpu_check.sh --device-env $OUT", carry=[".whl", ".gpu-data"], timeout_s=560)
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    tokenizer_from=${2:?"--prepare TOKENIZER_FOLDER (a converted SmolLM2 folder)"}
    rm -rf .gpu-data && mkdir -p .gpu-data/scifact/qrels .gpu-data/tokenizer
    cp ../shared/data/scifact/corpus.jsonl .gpu-data/scifact/
    cp ../shared/data/scifact/queries.jsonl .gpu-data/scifact/
    cp ../shared/data/scifact/qrels/train.tsv .gpu-data/scifact/qrels/
    cp "$tokenizer_from"/tokenizer.json "$tokenizer_from"/tokenizer_config.json .gpu-data/tokenizer/
    du -sh .gpu-data
    exit 0
fi

if [ "${1:-}" = "--wheels" ]; then  # what the device image lacks (docs/GPU.md); about 45 MB, git-ignored
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
        pydantic pydantic-core annotated-types typing-inspection typing_extensions datasets dill multiprocess bitsandbytes
    du -sh .whl
    exit 0
fi

if [ "${1:-}" = "--device-env" ]; then  # the image's torch lives in a venv that is not first on PATH
    shift
    export PATH=/opt/torch/.venv/bin:$PATH PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
    # a `python` symlink outside the venv would start the bare interpreter (no venv, no torch): use a wrapper
    mkdir -p /tmp/bin && printf '#!/bin/sh\nexec /opt/torch/.venv/bin/python3 "$@"\n' > /tmp/bin/python
    chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH
fi

out=${1:?usage: scripts/gpu_check.sh OUT [DATA]}
data=${2:-.gpu-data}
shapes=${GPU_CHECK_SHAPES-qwen2.5-7b qwen2.5-1.5b smollm2-135m}
device=${GPU_CHECK_DEVICE:-cuda}
limit=${GPU_CHECK_LIMIT:-2000}
dtype=bfloat16 train_batch=512 train_chunk=128 train_length=256
[ "$device" = cpu ] && dtype=float32 train_batch=8 train_chunk=4 train_length=64
work=$(mktemp -d)
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
budget=${GPU_CHECK_BUDGET:-480}
deadline=$(( $(date +%s) + budget ))
step() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }
# bounded CAP CMD...: run CMD for at most CAP seconds and never past the deadline; says why when it did not finish
bounded() {
    local cap=$1 left
    shift
    left=$(( deadline - $(date +%s) - 10 ))
    # every caller sends CMD's output to the log already: one line there, not two
    if [ "$left" -lt 15 ]; then echo "skipped: the $budget s budget is spent" >> "$log"; return 124; fi
    [ "$cap" -gt "$left" ] && cap=$left
    timeout --kill-after=5 "$cap" "$@"
    local rc=$?
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo "stopped after $cap s" >> "$log"
    return "$rc"
}

# The table is rebuilt after every benchmark, so a run cut short by the device's time limit keeps what it measured.
summarize() {
python - "$work" "$out" <<'PY' >> "$log" 2>&1
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
reports = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
(out / "gpu_check.json").write_text(json.dumps(reports, indent=2) + "\n")
lines = ["| benchmark | system | median s (encode: corpus, train: step) | tokens/s | vs sentence-transformers | MFU "
         "| peak MiB |", "|---|---|---|---|---|---|---|"]
for name, report in reports.items():
    for row in report.get("results", []):
        ratio = row.get("speedup_vs_st", report.get("tokens_per_s_ratio_llm2emb_over_st", "-"))
        lines.append(f"| {name} | {row.get('system')} | {row.get('median_s', row.get('median_step_s', '-'))} | "
                     f"{row.get('tokens_per_s', '-')} | {ratio} | {row.get('mfu', '-')} | "
                     f"{row.get('peak_memory_mib', '-')} |")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
PY
}

step "nvidia-smi"; (nvidia-smi || true) >> "$log" 2>&1
step "versions"
python - <<'PY' >> "$log" 2>&1
import importlib.metadata as metadata
import sys
names = ("torch", "transformers", "peft", "accelerate", "sentence-transformers", "bitsandbytes", "flash-attn", "datasets")
found = []
for name in names:
    try:
        found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        found.append(f"{name} absent")
print("python", sys.version.split()[0], "|", ", ".join(found))
PY
flash=$(python -c "import importlib.util as u; print(int(u.find_spec('flash_attn') is not None))")
bnb=$(python -c "import importlib.util as u; print(int(u.find_spec('bitsandbytes') is not None))")
backends="padded,packed"; st_attns="sdpa"
if [ "$flash" = 1 ]; then backends="padded,packed,flash_attn"; st_attns="sdpa flash_attention_2"; fi
[ "$device" = cpu ] && backends="padded,packed"
head -n "$limit" "$data/scifact/corpus.jsonl" > "$work/documents.jsonl"

train() {  # train SHAPE NAME [extra bench_train arguments]: one training-step benchmark against CachedMNRL
    local shape=$1 name=$2
    shift 2
    step "train $name"
    bounded 150 python -m scripts.bench_train --model "$work/$shape" --data "$data/scifact" \
        --device "$device" --dtype "$dtype" --batch-size "$train_batch" --mini-batch "$train_chunk" \
        --max-length "$train_length" --lora 16 "$@" \
        --json "$work/train-$name.json" >> "$log" 2>&1 || echo "failed" >> "$log"
    summarize
}

# `llm2emb encode` itself, as a user runs it (no --device: the GPU by default), on the documents bench_encode
# timed, at the folder's max_length (512, as bench_encode's --max-length); the seconds include loading the model.
cli_encode() {
    local shape=$1
    step "llm2emb encode $shape (the command line, device auto)"
    local started ended
    started=$(date +%s.%N)
    if bounded 150 python -m llm2emb.cli encode "$work/$shape" --input "$work/documents.jsonl" --documents --quiet \
        --dtype "$dtype" --batch-size 64 --output "$work/cli-$shape.npy" >> "$log" 2>&1; then
        ended=$(date +%s.%N)
        python - "$work/cli-$shape.json" "$started" "$ended" "$(wc -l < "$work/documents.jsonl")" <<'PY' >> "$log" 2>&1
import json, sys
path, started, ended, documents = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
seconds = round(ended - started, 2)
json.dump({"results": [{"system": "llm2emb encode (CLI, load included)", "median_s": seconds,
                        "documents": documents, "documents_per_s": round(documents / seconds, 1)}]},
          open(path, "w"), indent=2)
PY
    else
        echo "failed" >> "$log"
    fi
    rm -f "$work/cli-$shape.npy"
    summarize
}

# The largest shape first (issue 31): the 7B encode, the CLI, then training steps that fill the GPU (LoRA, and
# QLoRA 4-bit at 7B), so that a budget cut short loses the small shapes, not the figures the goals are about.
for shape in $shapes; do
    step "model $shape"
    bounded 150 python -m scripts.random_model --shape "$shape" --tokenizer "$data/tokenizer" --out "$work/$shape" \
        --dtype "$dtype" >> "$log" 2>&1 || { echo "model $shape failed" >> "$log"; continue; }
    for st_attn in $st_attns; do
        step "encode $shape (sentence-transformers $st_attn)"
        bounded 150 python -m scripts.bench_encode --model "$work/$shape" --data "$data/scifact" --limit "$limit" \
            --device "$device" --dtype "$dtype" --backends "$backends" --st-attn "$st_attn" --max-length 512 \
            --batch-size 64 --json "$work/encode-$shape-$st_attn.json" >> "$log" 2>&1 || echo "failed" >> "$log"
        summarize
    done
    cli_encode "$shape"
    train "$shape" "$shape-lora"
    if [ "$shape" = qwen2.5-7b ] && [ "$bnb" = 1 ] && [ "$device" != cpu ]; then
        train "$shape" "$shape-qlora4" --quantization 4bit
    fi
    rm -rf "${work:?}/$shape"  # the next shape's weights need the disk
done

# The CUDA tests, then the FSDP test (a torchrun subprocess, up to 120 s per case) on what the benchmarks leave of
# the budget: a hanging rendezvous then costs no speed figure.
if [ "${GPU_CHECK_TESTS:-1}" = 1 ]; then
step "CUDA tests but FSDP"
bounded 120 python -m pytest -v tests/test_cuda.py -k "not fsdp" > "$out/test_cuda.txt" 2>&1
echo "exit $?" >> "$out/test_cuda.txt"
tail -n 3 "$out/test_cuda.txt" | tee -a "$log"

step "FSDP test"
bounded 260 python -m pytest -v tests/test_cuda.py -k fsdp >> "$out/test_cuda.txt" 2>&1
echo "exit $?" >> "$out/test_cuda.txt"
tail -n 3 "$out/test_cuda.txt" | tee -a "$log"
fi

step "summary"; summarize; tee -a "$log" < "$out/gpu_check.md"
rm -rf "$work"
echo "done: $out" | tee -a "$log"
