#!/usr/bin/env bash
# The first run on a lent GPU (docs/training.md, "First run on a GPU"): one step a device call, each well inside
# the call's 10 minutes, each writing its log and JSON results under $OUT (./gpu_out when OUT is unset).
#
#   bash bench/gpu_session.sh setup      carried wheels (.whl/) into $GPU_SESSION_SITE, nanorl and its plugins
#                                        importable without pip or the network, versions and a CUDA sanity check
#   bash bench/gpu_session.sh tests      the CUDA and model tests, then the whole suite, on the GPU
#   bash bench/gpu_session.sh bench      bench/train_memory.py (depths 8, 12, 20) and bench/attention.py
#   bash bench/gpu_session.sh pipeline   `nanorl pipeline --task arith --depth 8` with a few steps a stage,
#                                        peak GPU memory per stage against the estimate
#   bash bench/gpu_session.sh all        the four in order (longer than one device call allows)
#
# Every step runs `setup` first (idempotent, a few seconds). What comes back from $OUT (8 files at most):
#   session.log  everything printed          tests-gpu.xml, tests-all.xml  pytest's JUnit reports
#   bench.jsonl  each benchmark's JSON line  pipeline.json, metrics.jsonl, report.md  the pipeline's results
#
# Knobs: PYTHON (python3), GPU_SESSION_SITE (/tmp/site), GPU_SESSION_WHL (.whl), GPU_SESSION_HOME (the run's
# NANORL_HOME, /tmp/nanorl-gpu-session), GPU_SESSION_STEP_S (540: a step's time, all its commands bounded by it),
# GPU_SESSION_RESUME=1 (pipeline: go on with the last call's run), GPU_SESSION_INSTALL=pip (pip install -e
# instead of PYTHONPATH), GPU_SESSION_ALLOW_CPU=1 (a dry run without a GPU: tiny shapes, the same paths and files).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
PY="${PYTHON:-python3}"
SITE="${GPU_SESSION_SITE:-/tmp/site}"
WHL="${GPU_SESSION_WHL:-$ROOT/.whl}"
HOME_DIR="${GPU_SESSION_HOME:-/tmp/nanorl-gpu-session}"
CPU="${GPU_SESSION_ALLOW_CPU:-0}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

export COLUMNS="${COLUMNS:-150}" # rich's tables in the log, which is no terminal
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET # compiled kernels on the GPU; the CPU dry run's tests and attention.py set it themselves

log() { printf '\n=== %s %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# A step must end inside the device call's 600 s: each command gets at most what the step has left of
# GPU_SESSION_STEP_S (540 s, counted from the step's start, setup included). SIGINT first, so that pytest
# still writes its report and a benchmark its traceback; SIGKILL 15 s later.
STEP_S="${GPU_SESSION_STEP_S:-540}"
bounded() { # bounded WANT_SECONDS CMD...: CMD under min(WANT, what is left), or exit 124 at once when < 20 s is
	local want=$1 left=$((STEP_S - SECONDS))
	shift
	((left < want)) && want=$left
	if ((want < 20)); then
		echo "skipped, the step's time is spent: $*"
		return 124
	fi
	timeout -s INT -k 15 "$want" "$@"
}

# ---- setup ------------------------------------------------------------------------------------------------
setup() {
	[ -n "${_SETUP_DONE:-}" ] && return 0
	log "setup (root $ROOT, python $(command -v "$PY"), out $OUT)"
	mkdir -p "$SITE/bin"
	# 1. carried wheels (rustbpe: the tokenizer stage), installed once per set of wheels
	shopt -s nullglob
	local wheels=("$WHL"/*.whl)
	shopt -u nullglob
	if ((${#wheels[@]})); then
		local stamp
		stamp="$(ls -l "${wheels[@]}" | md5sum | cut -c1-16)"
		if [ "$(cat "$SITE/.wheels" 2>/dev/null)" != "$stamp" ]; then
			"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
			echo "$stamp" >"$SITE/.wheels"
			echo "installed into $SITE: ${wheels[*]##*/}"
		else
			echo "wheels already in $SITE: ${wheels[*]##*/}"
		fi
	else
		echo "no wheels in $WHL (rustbpe is needed by the pipeline's tokenizer stage: see docs/training.md)"
	fi
	# 2. nanorl and its plugins from this checkout, without pip's resolver, a build or the network
	local src="$ROOT/src:$ROOT/plugins/aqua/src:$ROOT/plugins/gsm8k/src:$ROOT/plugins/lambda/src"
	if [ "${GPU_SESSION_INSTALL:-path}" = pip ]; then
		# needs setuptools >= 77 in the interpreter (pyproject's license field); writes into its site-packages
		if ! "$PY" -c 'import nanorl_aqua, nanorl' 2>/dev/null; then
			"$PY" -m pip install -q --no-deps --no-build-isolation --no-index \
				-e . -e plugins/aqua -e plugins/gsm8k -e plugins/lambda
		fi
		export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
	else
		export PYTHONPATH="$src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
		# entry points (the `nanorl` plugin group) are found through dist-info folders on sys.path; skipped where
		# nanorl is installed already (a dev venv), which would list every plugin twice
		"$PY" - "$SITE" "$ROOT" <<-'EOF'
			import sys, tomllib
			from importlib import metadata
			from pathlib import Path
			site, root = Path(sys.argv[1]), Path(sys.argv[2])
			try:
			    found = metadata.distribution("nanorl")
			except metadata.PackageNotFoundError:
			    found = None
			where = Path(str(found.locate_file(""))).resolve() if found is not None else None
			if where is not None and where != site.resolve():
			    print(f"nanorl is installed already (in {where}): no metadata written")
			    sys.exit(0)
			for proj in ("", "plugins/aqua", "plugins/gsm8k", "plugins/lambda"):
			    p = tomllib.loads((root / proj / "pyproject.toml").read_text())["project"]
			    name, version = p["name"], p["version"]
			    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
			    info.mkdir(parents=True, exist_ok=True)
			    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
			    groups = {"console_scripts": p.get("scripts", {}), **p.get("entry-points", {})}
			    text = "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items() if eps)
			    (info / "entry_points.txt").write_text(text)
			    (info / "INSTALLER").write_text("bench/gpu_session.sh\n")
			print(f"nanorl and its plugins run from {root} (PYTHONPATH), entry points in {site}")
		EOF
	fi
	# `nanorl` on the PATH, whichever way (pip's console script lands in the interpreter's bin, maybe off the PATH)
	printf '#!/bin/sh\nexec "%s" -m nanorl "$@"\n' "$(command -v "$PY")" >"$SITE/bin/nanorl"
	chmod +x "$SITE/bin/nanorl"
	export PATH="$SITE/bin:$PATH"
	# 3. what there is
	if command -v nvidia-smi >/dev/null; then
		nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
	else
		echo "no nvidia-smi"
	fi
	"$PY" - "$CPU" <<-'EOF'
		import importlib, sys
		import torch, nanorl
		cuda = torch.cuda.is_available()
		print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {cuda}")
		for mod in ("triton", "rustbpe", "tiktoken", "numpy", "safetensors", "datasets", "wandb", "boto3", "moto"):
		    try:
		        m = importlib.import_module(mod)
		        print(f"  {mod} {getattr(m, '__version__', '')}")
		    except Exception as e:
		        print(f"  {mod}: missing ({type(e).__name__})")
		print(f"nanorl {nanorl.__version__} from {nanorl.__file__}")
		if cuda:
		    p = torch.cuda.get_device_properties(0)
		    print(f"GPU {p.name}: {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs,"
		          f" bf16 {torch.cuda.is_bf16_supported()}")
		    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
		    print("  a bf16 matmul on it:", float((x @ x).float().abs().mean()))
		elif sys.argv[1] != "1":
		    sys.exit("no CUDA device: set GPU_SESSION_ALLOW_CPU=1 for a dry run on the CPU")
	EOF
	nanorl plugins list || true
	_SETUP_DONE=1
}

# ---- tests ------------------------------------------------------------------------------------------------
tests() {
	setup
	local rc=0
	# every test that skips without CUDA (tests/test_kernels.py: the `gpu` marker) and the model's own, on the GPU
	log "tests: CUDA kernels and the model"
	bounded 200 "$PY" -m pytest -q -p no:cacheprovider --timeout=150 -rfEs --durations=15 \
		--junitxml="$OUT/tests-gpu.xml" tests/test_kernels.py tests/test_model.py tests/test_architecture.py \
		tests/test_engine.py || rc=$?
	echo "tests (CUDA and model): exit $rc"
	# then the whole suite: with a GPU present, every test whose config says device=auto trains on it (bf16,
	# the Triton kernel), so the stages' GPU paths run too; tests needing moto/datasets/wandb skip or fail here
	log "tests: the whole suite"
	local rc2=0
	bounded 600 "$PY" -m pytest -q -p no:cacheprovider --timeout=120 -rfEs --durations=15 \
		--junitxml="$OUT/tests-all.xml" || rc2=$?
	echo "tests (whole suite): exit $rc2"
	return $((rc || rc2))
}

# ---- bench ------------------------------------------------------------------------------------------------
# one benchmark: its output into the log, its last line (the JSON object) into bench.jsonl, or an error record
bench_one() {
	local limit=$1 name=$2
	shift 2
	log "bench: $name $*"
	local tmp rc=0
	tmp="$(mktemp)"
	bounded "$limit" "$PY" "bench/$name" "$@" 2>&1 | tee "$tmp" || rc=$?
	"$PY" - "$tmp" "$name" "$rc" "$*" >>"$OUT/bench.jsonl" <<-'EOF'
		import json, sys
		path, name, rc, args = sys.argv[1:]
		lines = [l for l in open(path, errors="replace").read().splitlines() if l.strip()]
		try:
		    rec = json.loads(lines[-1])
		    assert isinstance(rec, dict)
		except Exception:
		    rec = {"bench": name.removesuffix(".py"), "error": f"exit {rc}", "tail": lines[-15:]}
		rec["args"] = args
		print(json.dumps(rec))
	EOF
	rm -f "$tmp"
	return "$rc"
}

bench() {
	setup
	local rc=0
	if [ "$CPU" = 1 ]; then
		bench_one 300 train_memory.py --depths 2 || rc=1
		bench_one 300 attention.py || rc=1
	else
		# the estimate behind the GPU batch size against the peak of real steps at the rows it picks; one depth
		# a process, so an out-of-memory error at one depth leaves the others' figures
		# the GPU goal first: Triton attention vs SDPA flash (T 1k-8k, D 64/128); the autotuner compiles on first use
		bench_one 420 attention.py --reps 20 || rc=1
		for d in 8 12 20; do bench_one 90 train_memory.py --depths "$d" || rc=1; done
	fi
	# model_speed, train_speed, generate, grpo_step and the tokenizer/loader benches measure the CPU goals
	# (BENCHMARKS.md's CPU shape, fp32, threads): they take no device and run on the CPU even here
	echo "bench.jsonl:"
	cat "$OUT/bench.jsonl"
	return "$rc"
}

# ---- pipeline ---------------------------------------------------------------------------------------------
pipeline() {
	setup
	local run=gpu-d8 args
	if [ "$CPU" = 1 ]; then
		run=cpu-dry
		args=(--preset tiny base.steps=12 mid.steps=2 sft.steps=8 rl.steps=2 rl.prompts_per_step=4 rl.group_size=4
			rl.dynamic_sampling=false rl.max_new_tokens=48 rl.kl_every=1 eval.max_examples=8 eval.samples=0
			eval.max_new_tokens=48 tokenizer.train_chars=1000000)
	else
		# the GPU path: depth 8 (512 wide, 4 heads of 128, vocab 65,536, context 2,048), bf16 autocast, Triton
		# attention, device_batch_size from the memory estimate. A step is the real one: base and mid 2^19 tokens
		# (256 rows of 2,048), SFT 32 conversations, RL 8 prompts x 8 completions of <= 256 tokens; only the
		# step counts are cut (the budget rule would give base ~2,200 steps)
		args=(--depth 8 base.steps=30 base.eval_every=15 base.checkpoint_every=10 mid.steps=4 sft.steps=80
			sft.eval_every=40 rl.steps=6 rl.kl_every=3 eval.max_examples=100)
	fi
	# a fresh run, or with GPU_SESSION_RESUME=1 the last call's (finished stages skipped, the interrupted one
	# resumed from its last checkpoint: base saves every base.checkpoint_every steps)
	[ "${GPU_SESSION_RESUME:-0}" = 1 ] || rm -rf "${HOME_DIR:?}/runs/$run" "$HOME_DIR/nvsmi.csv"
	nanorl model info --depth 8 # the estimate the stages size their batches by (the GPU run's model)
	mkdir -p "$HOME_DIR"
	log "pipeline: nanorl pipeline --task arith --name $run ${args[*]}"
	local smi_pid="" rc=0
	if command -v nvidia-smi >/dev/null; then
		nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 500 >>"$HOME_DIR/nvsmi.csv" &
		smi_pid=$!
	fi
	# in-process, with one more telemetry hook: torch.cuda's peak per stage into metrics.jsonl
	NANORL_HOME="$HOME_DIR" bounded 600 "$PY" - pipeline --task arith --name "$run" --json "${args[@]}" <<-'EOF' || rc=$?
		import sys, time
		import torch
		from nanorl.api import TelemetryHook
		from nanorl.plugins import get_plugins

		class GpuMemory(TelemetryHook):
		    name = "gpu_session_memory"
		    def on_stage_start(self, info):  # the stage's model is on the GPU already: the peak starts from it
		        self.t0 = time.time()
		        if torch.cuda.is_initialized():
		            torch.cuda.synchronize()
		            torch.cuda.reset_peak_memory_stats()
		    def on_stage_end(self, info, metrics):
		        out = {"stage_wall_s": round(time.time() - self.t0, 2)}
		        if torch.cuda.is_initialized():
		            out["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
		            out["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
		        return out

		get_plugins().registry["telemetry"]["gpu_session_memory"] = GpuMemory()
		from nanorl.cli import main
		main(sys.argv[1:])
	EOF
	[ -n "$smi_pid" ] && kill "$smi_pid" 2>/dev/null && wait "$smi_pid" 2>/dev/null || true
	echo "pipeline: exit $rc"
	local dir="$HOME_DIR/runs/$run"
	cp "$dir/metrics.jsonl" "$OUT/" 2>/dev/null || echo "no metrics.jsonl"
	cp "$dir/report.md" "$OUT/" 2>/dev/null || echo "no report.md"
	"$PY" - "$dir" "$HOME_DIR/nvsmi.csv" "$rc" >"$OUT/pipeline.json" <<-'EOF'
		import json, math, statistics, sys
		from pathlib import Path
		run, smi, rc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
		from nanorl.config import from_toml_file
		from nanorl.model.counts import rows_that_fit, train_memory
		from nanorl.stages.common import GPU_MAX_ROWS, split_rows
		from nanorl.telemetry import read_metrics
		import torch
		out = {"exit": rc, "run": str(run), "stages": {}}
		recs = read_metrics(run)
		cfg = from_toml_file(run / "run.toml") if (run / "run.toml").is_file() else None
		gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 2**30
		out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (dry run; estimate for 80 GiB)"
		for stage in ("tokenizer", "base", "mid", "sft", "rl", "eval"):
		    steps = [r["metrics"] for r in recs if r["stage"] == stage and "kind" not in r]
		    end = next((r["metrics"] for r in recs if r["stage"] == stage and r.get("kind") == "end"), None)
		    if not steps and end is None:
		        continue
		    s = {"logged_steps": len(steps)}
		    if end:
		        s.update({k: end[k] for k in ("stage_wall_s", "gpu_peak_allocated_gib", "gpu_peak_reserved_gib", "seconds",
		                                      "loss", "val_bpb", "val_loss", "tokens_per_step") if k in end})
		    for key in ("step_s", "tok_per_s", "sample_s", "train_s"):  # medians after the first step (it compiles)
		        v = [m[key] for m in steps[1:] or steps if isinstance(m.get(key), (int, float))]
		        if v:
		            s[f"median_{key}"] = statistics.median(v)
		    if cfg is not None and stage in ("base", "mid", "sft"):
		        tcfg, T = getattr(cfg, stage), cfg.model.seq_len
		        fit = tcfg.device_batch_size or rows_that_fit(cfg.model, gpu)
		        if tcfg.total_batch_tokens:
		            rows, passes = split_rows(math.ceil(tcfg.total_batch_tokens / T), fit)
		        else:
		            rows, passes = (fit if tcfg.device_batch_size else min(fit, GPU_MAX_ROWS)), 1
		        est = train_memory(cfg.model, rows)["total"] / 2**30
		        s.update(rows_per_pass=rows, passes=passes, estimate_gib=round(est, 2))
		        if "gpu_peak_allocated_gib" in s:
		            s["peak_over_estimate"] = round(s["gpu_peak_allocated_gib"] / est, 3)
		    out["stages"][stage] = s
		out["evals"] = {}
		for f in sorted((run / "eval").glob("*.json")):
		    modes = json.loads(f.read_text()).get("modes", {})
		    out["evals"][f.stem] = {m: {k: r.get(k) for k in ("n", "accuracy", "format_rate")} for m, r in modes.items()}
		out["wall_s"] = round(recs[-1]["time"] - recs[0]["time"], 1) if recs else None
		if smi.is_file():
		    used = [int(l.split(",")[1]) for l in smi.read_text().splitlines() if l.count(",") == 1 and l.split(",")[1].strip().isdigit()]
		    out["nvidia_smi_peak_used_mib"] = max(used) if used else None
		    out["nvidia_smi_samples"] = len(used)
		print(json.dumps(out, indent=1))
	EOF
	cat "$OUT/pipeline.json"
	return "$rc"
}

# ---- dispatch ---------------------------------------------------------------------------------------------
[ $# -eq 1 ] || {
	sed -n '2,/^set -euo/p' "$0" | sed '$d'

	exit 2
}
step=$1
case "$step" in
setup | tests | bench | pipeline | all) ;;
*)
	echo "unknown step $step (setup, tests, bench, pipeline, all)" >&2
	exit 2
	;;
esac
exec > >(tee -a "$OUT/session.log") 2>&1
log "gpu_session.sh $step"
if [ "$step" = all ]; then # each step with its own GPU_SESSION_STEP_S
	rc=0
	for s in setup tests bench pipeline; do
		SECONDS=0
		"$s" || rc=1
	done
	exit "$rc"
fi
SECONDS=0
"$step"
