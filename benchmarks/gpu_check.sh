#!/usr/bin/env bash
# One prepared check of mnistlab on a CUDA GPU, for a session lent one (issue 21, section 7): the environment
# (GPU, driver, torch, CUDA, cuDNN, NCCL), cnn-fast and seed-b trained on the GPU in float32 and in bfloat16
# autocast (`training.amp`: time to 99% test accuracy and seconds per epoch), `--nproc 1` under torchrun, a
# DistributedDataParallel step through NCCL, and `mnistlab serve --device cuda` answering requests over HTTP on
# loopback. Every step is bounded by `timeout` and the whole by BUDGET_S (default 480 s, the 8 minutes it is
# sized for); a step that fails is recorded and the next one runs. The figures go to one file,
# $OUT/gpu_check.md, and every step's output to $OUT/gpu_check.log.
#
# Run from the repository root (no install needed: it puts src/ on PYTHONPATH):
#   bash benchmarks/gpu_check.sh                                   # on the GPU machine
#   GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python OUT=/tmp/gpu-dry bash benchmarks/gpu_check.sh
#                                                                  # dry run of the plumbing on a CPU, 1 epoch each
# MNIST: $MNISTLAB_DATA, else the first of ../shared/data/mnist, shared/data/mnist, .mnist that has the four
# .gz files. The `../shared` beside a checkout does not travel to the device machine
# (/work/.library/device/README.md): copy the four files into `.mnist/` (ignored in .git/info/exclude) and
# name `.mnist` in the call's `carry`.
# `mnistlab serve` needs the web extra, which the device image lacks (fastapi, starlette, pydantic, uvicorn,
# python-multipart, swagger-ui-bundle): carry it as wheels in `.whl/` (ignored, named in `carry`), fetched here
# for the device's Python 3.12 at requirements.lock's versions with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl fastapi==0.165.0 \
#     starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     annotated-doc==0.0.7 uvicorn==0.54.0 python-multipart==0.0.34 swagger-ui-bundle==1.1.0
# This script installs them into /tmp/site when fastapi is missing. Without them the serve step is recorded as
# failed and the rest still runs.
set -u -o pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
BUDGET_S=${BUDGET_S:-480}
RUNS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
REPORT=$OUT/gpu_check.md
LOG=$OUT/gpu_check.log
mkdir -p "$OUT"
: >"$REPORT"
: >"$LOG"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then EPOCHS_FAST=2 EPOCHS_MLP=5; else EPOCHS_FAST=1 EPOCHS_MLP=1; fi
FAILED=()

say() { printf '%s\n' "$*" >>"$REPORT"; }
left() { echo $((BUDGET_S - SECONDS)); }

# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout` (at most the budget left, less 20 s for the rest),
# its output into the log; a failure or timeout is recorded and the script goes on.
step() {
	local name=$1 limit=$2
	shift 2
	local allowed=$(($(left) - 20))
	((allowed < limit)) && limit=$allowed
	if ((limit < 5)); then
		say "- **$name: skipped**, the ${BUDGET_S} s budget is spent"
		FAILED+=("$name (no time left)")
		return 1
	fi
	printf '\n===== %s (limit %s s) =====\n$ %s\n' "$name" "$limit" "$*" >>"$LOG"
	local start=$SECONDS rc=0
	timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
	if ((rc != 0)); then
		local why="exit code $rc"
		((rc == 124 || rc == 137)) && why="timed out after $limit s"
		say "- **$name: failed** ($why, $((SECONDS - start)) s; see gpu_check.log)"
		FAILED+=("$name ($why)")
		return 1
	fi
	return 0
}

find_mnist() {
	local dir
	for dir in "${MNISTLAB_DATA:-}" ../shared/data/mnist shared/data/mnist .mnist; do
		if [ -n "$dir" ] && [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
			(cd "$dir" && pwd)
			return 0
		fi
	done
	return 1
}

# The figures of one training run from its metrics.json, as a table row.
run_row() {
	"$PY" - "$@" <<'PY'
import json, statistics, sys
label, run_dir, wall = sys.argv[1], sys.argv[2], float(sys.argv[3])
m = json.load(open(f"{run_dir}/metrics.json"))
epochs, elapsed, to99 = m["epochs"], 0.0, None
for e in epochs:
    elapsed += e["train_seconds"]
    if to99 is None and e["test_accuracy"] >= 0.99:
        to99 = elapsed
later = [e["train_seconds"] for e in epochs[1:]]
cells = [
    label,
    str(len(epochs)),
    f"{epochs[0]['train_seconds']:.2f}",
    f"{statistics.median(later):.2f}" if later else "-",
    f"{elapsed:.2f}",
    f"{to99:.2f} s" if to99 is not None else "not reached",
    f"{100 * m['final']['test_accuracy']:.2f}%",
    f"{wall:.0f}",
]
print("| " + " | ".join(cells) + " |")
PY
}

train_row() { # LABEL CONFIG EPOCHS AMP [EXTRA...]
	local label=$1 config=$2 epochs=$3 amp=$4
	shift 4
	local dir=$RUNS/$config-amp-$amp$*
	dir=${dir// /}
	local start=$SECONDS
	if step "train $label" 150 "$PY" -m mnistlab train --config "$config" --epochs "$epochs" --device "$DEVICE" \
		--set "training.amp=$amp" --out "$dir" --quiet "$@"; then
		run_row "$label" "$dir" $((SECONDS - start)) >>"$TABLE" 2>>"$LOG" || FAILED+=("$label: no metrics")
	fi
}

say "# mnistlab GPU check"
say ""
say "Command: \`bash benchmarks/gpu_check.sh\` (device $DEVICE, budget ${BUDGET_S} s), $(date -u '+%Y-%m-%d %H:%M UTC')."
if [ "$DEVICE" != cuda ]; then
	say "**Dry run on $DEVICE** (GPU_CHECK_DEVICE=$DEVICE, 1 epoch each): it proves the script's plumbing, not a GPU's figures."
fi
say ""

# ---------------------------------------------------------------------------------------------- environment
say "## Environment"
say ""
say '```'
{
	command -v nvidia-smi >/dev/null &&
		nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 |
		sed 's/^/gpu: /'
	echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores here"
	timeout 60 "$PY" - "$DEVICE" <<'PY' 2>&1
import platform, sys
import torch
import mnistlab
from mnistlab import devices
device = torch.device(sys.argv[1])
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, mnistlab {mnistlab.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"torch sees {torch.cuda.device_count()} GPU(s): {p.name}, capability {p.major}.{p.minor}, "
          f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; NCCL "
          f"{'.'.join(map(str, torch.cuda.nccl.version()))}; bf16 native: {devices.bf16_native(device)}")
else:
    print(f"torch sees no CUDA GPU; {devices.describe_cpu()}")
PY
} >>"$REPORT" 2>&1
say '```'
say ""
if [ "$DEVICE" = cuda ] && ! timeout 60 "$PY" -c "import torch; assert torch.cuda.is_available()" >>"$LOG" 2>&1; then
	say "**torch sees no CUDA GPU: every CUDA step below will fail.**"
	say ""
fi

if MNIST=$(find_mnist); then
	export MNISTLAB_DATA=$MNIST
	say "MNIST: $MNIST"
else
	say "**MNIST not found** (MNISTLAB_DATA, ../shared/data/mnist, shared/data/mnist, .mnist): the trainings fail."
	FAILED+=("MNIST not found")
fi
say ""

# ---------------------------------------------------------------------------------------------- training
TABLE=$RUNS/table.md
: >"$TABLE"
say "## Training on $DEVICE"
train_row "cnn-fast float32" cnn-fast "$EPOCHS_FAST" false
train_row "cnn-fast bf16 autocast" cnn-fast "$EPOCHS_FAST" true
train_row "seed-b float32 (by-hand gradients)" seed-b "$EPOCHS_MLP" false
train_row "seed-b bf16 autocast (autograd)" seed-b "$EPOCHS_MLP" true
train_row "cnn-fast float32, --nproc 1 (torchrun)" cnn-fast 1 false --nproc 1
say ""
say "Seconds are training seconds (evaluation excluded) from each run's metrics.json; \"to 99%\" is the training"
say "time when the test accuracy first reached 99% after an epoch; \"wall s\" is the whole command (start-up, data,"
say "evaluation, saving). The first epoch carries CUDA's start (context, cuDNN's choice of kernels)."
say ""
say "| run | epochs | epoch 1 s | later epochs s (median) | train s | to 99% | final test acc | wall s |"
say "|---|---|---|---|---|---|---|---|"
cat "$TABLE" >>"$REPORT"
say ""

# ---------------------------------------------------------------------------------------------- NCCL and DDP
say "## DistributedDataParallel through NCCL (one rank under torchrun)"
say ""
PROBE=$RUNS/ddp_probe.py
cat >"$PROBE" <<'PY'
"""One cnn-fast step under DistributedDataParallel (mnistlab's BatchGradients, NCCL on CUDA, gloo on the CPU),
its gradients against plain autograd's on the same batch. `--nproc 1` alone starts no process group (one rank
needs none), so this forces the path several GPUs take."""
import copy, os, sys, time
import torch
import torch.distributed as dist
from mnistlab.config import load_config
from mnistlab.data.splits import load_data, standardize_, to_float
from mnistlab.models.gradients import make_gradient_fn
from mnistlab.models.losses import make_loss
from mnistlab.models.networks import build_model
from mnistlab.train import distributed

device = torch.device(sys.argv[1], int(os.environ.get("LOCAL_RANK", "0")) if sys.argv[1] == "cuda" else None)
if device.type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
config = load_config("cnn-fast")
torch.manual_seed(0)
model = build_model(config.model).to(device).to(memory_format=torch.channels_last)
reference = copy.deepcopy(model)
loss_fn = make_loss(config.training.loss, False, config.training.label_smoothing)
data = load_data("mnist", None, 5000, 0, device)
x = standardize_(to_float(data.train.images[:128]), (data.mean, data.std))
y = data.train.labels[:128]


class OneRankAsSeveral(distributed.Cluster):
    active = True  # one rank, but through DDP and its all-reduce as several would


cluster = OneRankAsSeveral(dist.get_rank(), dist.get_world_size(), 0, 1, dist.get_backend())
gradients = distributed.BatchGradients(cluster, model, lambda m: make_gradient_fn(m, config, loss_fn, torch.autocast(device.type, enabled=False)), by_hand=False)
make_gradient_fn(reference, config, loss_fn, torch.autocast(device.type, enabled=False))(x, y)
for _ in range(3):  # warm-up
    gradients(x, y, 128, 128)
if device.type == "cuda":
    torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(20):
    gradients(x, y, 128, 128)
if device.type == "cuda":
    torch.cuda.synchronize()
step_ms = (time.perf_counter() - start) / 20 * 1000
worst = max((p.grad - r.grad).abs().max().item() / max(r.grad.abs().max().item(), 1e-12)
            for p, r in zip(model.parameters(), reference.parameters()))
nccl = ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else "-"
print(f"backend {dist.get_backend()} (NCCL {nccl}), world {dist.get_world_size()}: DDP forward+backward+all-reduce of a "
      f"128-image cnn-fast batch {step_ms:.2f} ms; largest gradient difference from plain autograd {worst:.1e} "
      f"(relative to each tensor's largest)")
assert worst < 1e-3, worst
dist.destroy_process_group()
PY
if step "DDP probe" 90 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 "$PROBE" "$DEVICE"; then
	say "- $(grep '^backend ' "$LOG" | tail -n 1)"
fi
say ""

# ---------------------------------------------------------------------------------------------- serve
say "## mnistlab serve --device $DEVICE"
say ""
if ! timeout 60 "$PY" -c "import fastapi, uvicorn, multipart, swagger_ui_bundle" >>"$LOG" 2>&1 && [ -d .whl ]; then
	timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
		.whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
SERVED=$RUNS/serve.out
timeout --kill-after=5 120 "$PY" -m mnistlab serve --device "$DEVICE" --engine torch --port 0 --workers 1 \
	>"$SERVED" 2>&1 &
SERVER=$!
step "serve answers over HTTP" 100 "$PY" - "$SERVED" "$SERVER" <<'PY'
import base64, json, os, re, statistics, sys, time, urllib.request, io
from pathlib import Path
from PIL import Image
from mnistlab.data.splits import load_data

served, server = Path(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 90
while not (m := re.search(r"at (http://\S+)", served.read_text())):
    if time.monotonic() > deadline or not os.path.exists(f"/proc/{server}"):
        sys.exit(f"the server did not start:\n{served.read_text()[-2000:]}")
    time.sleep(0.2)
url = m.group(1).rstrip("/")
print(served.read_text().strip())
print("health:", urllib.request.urlopen(f"{url}/api/health", timeout=10).read().decode())
test = load_data("mnist", None, 0, 0).test


def png(i):
    buffer = io.BytesIO()
    Image.fromarray(255 - test.images[i].numpy()).save(buffer, "PNG")  # dark ink on white, as the page draws
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(i):
    body = json.dumps({"image": png(i)}).encode()
    request = urllib.request.Request(f"{url}/api/predict", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
    return (time.perf_counter() - start) * 1000, answer


ask(0)  # the first forward pass on the device
times, right = [], 0
for i in range(1, 41):
    ms, answer = ask(i)
    times.append(ms)
    right += int(answer["predictions"][0]["label"] == int(test.labels[i]))
print(f"answered 40 test digits one at a time: median {statistics.median(times):.1f} ms, "
      f"slowest {max(times):.1f} ms, {right}/40 right (the bundled model)")
PY
[ $? -eq 0 ] && say "- $(grep '^serving ' "$LOG" | tail -n 1)" && say "- $(grep '^answered ' "$LOG" | tail -n 1)"
kill "$SERVER" 2>/dev/null
wait "$SERVER" 2>/dev/null
say ""

# ---------------------------------------------------------------------------------------------- summary
say "## Summary"
say ""
if ((${#FAILED[@]})); then
	say "Failed or skipped: $(printf '%s; ' "${FAILED[@]}")"
else
	say "Every step passed."
fi
say ""
say "Took $SECONDS s of the ${BUDGET_S} s budget."
rm -rf "$RUNS"
echo "wrote $REPORT ($SECONDS s); failures: ${#FAILED[@]}"
