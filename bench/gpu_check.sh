#!/usr/bin/env bash
# One report of ecso on a GPU: builds llama-cpp-python for the backend (CUDA by default; Vulkan or Metal by flag)
# into a venv of its own (.ci/gpu-tier), runs the GPU test tier there, then `ecso bench` (plain vs safe path, reuse
# vs no reuse; --parallel 4 and 8 throughput), and writes everything to one JSON file.
#
#   bench/gpu_check.sh                         # CUDA (needs nvcc), report in gpu-report.json
#   bench/gpu_check.sh --backend vulkan        # Vulkan (on a machine with no GPU: Mesa lavapipe, not GPU timings)
#   bench/gpu_check.sh --backend metal --out m.json
#   bench/gpu_check.sh --quick                 # short answers, few rounds, the tier without its demo-model tests
#
# Attach the JSON to a report. The device is chosen by the backend's own variable (CUDA_VISIBLE_DEVICES,
# GGML_VK_VISIBLE_DEVICES; Vulkan defaults to device 0 here).
set -euo pipefail
cd "$(dirname "$0")/.."

backend=cuda
out=gpu-report.json
quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --backend) backend="${2:?--backend needs cuda, vulkan or metal}"; shift ;;
        --out) out="${2:?--out needs a file}"; shift ;;
        --quick) quick=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (--backend cuda|vulkan|metal, --out FILE, --quick)" >&2; exit 2 ;;
    esac
    shift
done
case "$backend" in cuda|vulkan|metal) ;; *) echo "gpu_check: unknown backend $backend" >&2; exit 2 ;; esac
if [ "$backend" = vulkan ]; then export GGML_VK_VISIBLE_DEVICES="${GGML_VK_VISIBLE_DEVICES:-0}"; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ "$quick" = 1 ]; then
    bench_args=(--repeats 1 --max-tokens 8); par_args=(--requests 4 --max-tokens 8); tier_args=(--quick)
else
    tier_args=()
    bench_args=(--repeats 3 --max-tokens 64); par_args=(--requests 16 --max-tokens 64)
fi

t0=$SECONDS
.ci/gpu-tier --backend "$backend" --prepare 2>&1 | tee "$work/prepare.log"
prepare_s=$((SECONDS - t0))
py=$(.ci/gpu-tier --backend "$backend" --print-python)

t0=$SECONDS
set +e
.ci/gpu-tier --backend "$backend" "${tier_args[@]}" -- --junitxml="$work/tier.xml" 2>&1 | tee "$work/tier.log"
tier_rc=${PIPESTATUS[0]}
set -e
tier_s=$((SECONDS - t0))

bench() {  # name, args...: one `ecso bench` run; its JSON (or its error) goes into the report
    local name="$1"; shift
    echo "gpu_check: ecso bench $*"
    local t=$SECONDS
    if "$(dirname "$py")/ecso" bench "$@" --json "$work/$name.json" >"$work/$name.txt" 2>"$work/$name.err"; then
        echo "$((SECONDS - t))" >"$work/$name.seconds"
        cat "$work/$name.txt"
    else
        echo "gpu_check: ecso bench $name failed: $(tail -1 "$work/$name.err")" >&2
    fi
}
bench costs --no-native "${bench_args[@]}"
bench parallel4 --parallel 4 "${par_args[@]}"
bench parallel8 --parallel 8 "${par_args[@]}"

"$py" - "$work" "$out" "$backend" "$prepare_s" "$tier_s" "$tier_rc" <<'EOF'
import json, platform, subprocess, sys, xml.etree.ElementTree as ET
from pathlib import Path

work, out, backend, prepare_s, tier_s, tier_rc = sys.argv[1:]
work = Path(work)
from ecso.runtime.devices import list_backends_and_devices
import llama_cpp

backends, devices = list_backends_and_devices()
tier = {"seconds": int(tier_s), "exit_code": int(tier_rc)}
if (work / "tier.xml").exists():
    suite = ET.parse(work / "tier.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    tier.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    tier["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                      if c.find("failure") is not None or c.find("error") is not None]
tier["log_tail"] = (work / "tier.log").read_text()[-3000:]
bench = {}
for name in ("costs", "parallel4", "parallel8"):
    f = work / f"{name}.json"
    if f.exists():
        bench[name] = json.loads(f.read_text())
        bench[name]["wall_seconds"] = int((work / f"{name}.seconds").read_text())
    else:
        err = work / f"{name}.err"
        bench[name] = {"error": err.read_text()[-2000:] if err.exists() else "not run"}
gpu = None
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    pass
emulated = any(n in d.description.lower() for d in devices for n in ("llvmpipe", "lavapipe", "swiftshader"))
report = {
    "backend": backend,
    "machine": {"platform": platform.platform(), "processor": platform.processor(), "nvidia_smi": gpu},
    "llama_cpp_python": llama_cpp.__version__, "llama_cpp": llama_cpp.__file__,
    "ggml_backends": backends, "devices": [d.__dict__ for d in devices],
    "prepare_seconds": int(prepare_s), "gpu_tier": tier, "bench": bench,
    "note": ("the device is a CPU-emulated Vulkan device (Mesa lavapipe): timings are NOT GPU timings"
             if emulated else "timings measured on the devices listed"),
}
Path(out).write_text(json.dumps(report, indent=2))
print(f"gpu_check: report written to {out} (tier exit code {tier_rc}; {report['note']})")
EOF
exit "$tier_rc"
