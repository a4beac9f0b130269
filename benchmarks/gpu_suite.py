"""Everything the GPU issue measures, in one call of under ~7 minutes on one H100/H200.

    python3 benchmarks/gpu_suite.py RESULTS [--device cuda] [--tiny] [--budget-s 420]

Steps, in order of value; each runs in its own process with a time limit taken from what is left
of ``--budget-s``, and a step that fails or runs out of time is recorded and the next one runs:

1. ``cuda_tests``: ``pytest tests/test_cuda.py`` (labels on CUDA in bf16 / fp16 / fp32 against
   CPU fp32, and a CUDA training step against the CPU's).
2. ``matmul``: the bf16 rate of an 8192^3 matrix product on this device (median of 10 after 3
   warm-ups), the yardstick the labeling figures are given against.
3. ``label_f0`` and ``label_f6``: ``bench_label.py`` with ``dm_nfnet_f0`` at 256 px and
   ``dm_nfnet_f6`` at 576 px, random weights, ImageNet-like JPEGs: the job (``label_dataset``,
   what ``labeler label`` runs) against the bare teacher forward on the same batches, img/s,
   the ratio, TFLOP/s as a fraction of the measured matmul rate, and peak GPU memory.
4. ``train``: ``bench_train.py`` with ``lvvit_s`` at 224 px in bf16: token labels against CE,
   ANF (full and rank D/4) and STA against token labels, ``--recipe lvvit`` against the
   default, and the loader (with the recipe's augmentation) against the model, on every core.
5. ``shard_tasks``: ``bench_shard_tasks.py`` with ``dm_nfnet_f0`` at 256 px: labeling shard by
   shard as a service worker does it, against one pass.
6. ``label_f6_compiled``: step 3's ``dm_nfnet_f6`` with ``--compile`` (``torch.compile``, the
   job's ``labeler label --compile``), 512 images, with what is left of the budget.

Step 3 also times one bare pass with timm's per-forward weight standardisation
(``--unfolded-pass``): what folding it (``prepare_for_inference``) is worth.

Not measured: the service path (API + Celery worker): the GPU machine has no Redis server.

``RESULTS`` gets ``results.json`` (every step's JSON, its status and seconds, rewritten after
each step so that a run cut short still returns what it measured), ``summary.txt`` (the targets
of the issue, each PASS / FAIL / not measured) and ``log`` (every step's output). ``--tiny``
shrinks every step to seconds on a CPU (``--device cpu --tiny``): a dry run of the whole script
that CI runs, so that the GPU minutes are not spent on a typo.

On the GPU machine (Python 3.12 with torch, timm, numpy, pillow, safetensors and pytest; no
package index), with the wheels of ``scripts/gpu-wheels.sh`` carried in ``.whl``::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
      && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_suite.py $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Step:
    name: str
    # Run from the repository root; "{json}" becomes the step's JSON path, "{matmul_tflops}"
    # the matmul step's rate (the option before it is dropped when it was not measured).
    argv: list[str]
    cap_s: float  # the most this step may take of the budget
    min_s: float = 20.0  # not started with less than this left
    env: dict[str, str] = field(default_factory=dict)  # added to the step's environment


def steps_for(device: str, tiny: bool) -> list[Step]:
    py = sys.executable
    cores = os.cpu_count() or 1
    if tiny:  # seconds on a CPU: the same code paths, toy sizes
        label = ["--images", "16", "--batch-size", "4", "--shard-size", "8", "--workers", "1"]
        return [
            Step("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "tests/test_cuda.py"], 120),
            Step("matmul", [py, str(HERE / "gpu_suite.py"), "--matmul", "{json}", "--device",
                            device, "--size", "256"], 30, 5),
            Step("label_f0", [py, str(HERE / "bench_label.py"), "--model", "test_nfnet",
                              "--input-size", "64", *label, "--unfolded-pass", "--device",
                              device, "--json-out", "{json}"], 60),
            Step("label_f6", [py, str(HERE / "bench_label.py"), "--model", "test_nfnet",
                              "--input-size", "96", *label, "--unfolded-pass", "--device",
                              device, "--json-out", "{json}"], 60),
            Step("train", [py, str(HERE / "bench_train.py"), "--model", "lvvit_t",
                           "--input-size", "64", "--batch-size", "4", "--steps", "1",
                           "--warmup", "1", "--parts-reps", "1", "--loader-images", "16",
                           "--loader-shard-size", "8", "--loader-epochs", "1",
                           "--loader-workers", "1", "--label-size", "128", "--label-grid", "4",
                           "--recipe", "lvvit", "--device", device, "--json-out", "{json}"],
                 120),
            Step("shard_tasks", [py, str(HERE / "bench_shard_tasks.py"), "--images", "16",
                                 "--shard-size", "8", "--batch-size", "4", "--workers", "1",
                                 "--input-size", "64", "--rounds", "1", "--device", device,
                                 "--json-out", "{json}"], 60),
            # The step's flags and figures, with torch.compile a no-op: inductor on this CPU
            # takes a minute a compile, and tests/test_cli.py runs it for real.
            Step("label_f6_compiled", [py, str(HERE / "bench_label.py"), "--model",
                                       "test_nfnet", "--input-size", "96", *label, "--compile",
                                       "--device", device, "--json-out", "{json}"], 60,
                 env={"TORCH_COMPILE_DISABLE": "1"}),
        ]
    peak = ["--peak-tflops", "{matmul_tflops}"]  # the rate the matmul step measured
    workers = str(max(1, cores - 2))  # decoding processes; the rest feeds the GPU
    return [
        Step("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_cuda.py"], 180),
        Step("matmul", [py, str(HERE / "gpu_suite.py"), "--matmul", "{json}", "--device",
                        device], 30, 5),
        Step("label_f0", [py, str(HERE / "bench_label.py"), "--model", "dm_nfnet_f0",
                          "--input-size", "256", "--images", "2048", "--batch-size", "128",
                          "--workers", workers, "--unfolded-pass", "--device", device, *peak,
                          "--json-out", "{json}"], 90, 45),
        Step("label_f6", [py, str(HERE / "bench_label.py"), "--model", "dm_nfnet_f6",
                          "--input-size", "576", "--images", "1024", "--batch-size", "64",
                          "--workers", workers, "--unfolded-pass", "--device", device, *peak,
                          "--json-out", "{json}"], 150, 60),
        Step("train", [py, str(HERE / "bench_train.py"), "--model", "lvvit_s",
                       "--input-size", "224", "--batch-size", "128", "--steps", "20",
                       "--warmup", "5", "--loader-images", "2048", "--loader-shard-size", "256",
                       "--loader-workers", str(cores), "--recipe", "lvvit", "--device", device,
                       "--json-out", "{json}"], 120, 45),
        Step("shard_tasks", [py, str(HERE / "bench_shard_tasks.py"), "--model", "dm_nfnet_f0",
                             "--input-size", "256", "--images", "2048", "--shard-size", "256",
                             "--batch-size", "128", "--workers", workers, "--threads", "4",
                             "--rounds", "2", "--device", device, "--json-out", "{json}"],
             90, 45),
        # Last: whether torch.compile pays, with what is left (its compile is not in the loop).
        Step("label_f6_compiled", [py, str(HERE / "bench_label.py"), "--model", "dm_nfnet_f6",
                                   "--input-size", "576", "--images", "512", "--batch-size",
                                   "64", "--workers", workers, "--compile", "--device", device,
                                   *peak, "--json-out", "{json}"], 240, 90),
    ]


# -- the matmul yardstick -----------------------------------------------------------------------

def matmul_rate(device: str, size: int, reps: int = 10) -> dict:
    import torch

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(3):
        a @ b
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
            "tflops": 2 * size**3 / seconds / 1e12, "device": device,
            "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                            else platform.processor() or "cpu")}


# -- the driver ---------------------------------------------------------------------------------

def environment(device: str) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "device": device,
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30,
                "multiprocessors": props.multi_processor_count}
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    for name in ("timm", "zarr", "numcodecs", "numpy"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env


def step_argv(step: Step, json_path: Path, matmul_tflops: float | None) -> list[str]:
    argv: list[str] = []
    for a in step.argv:
        if a == "{matmul_tflops}":
            if matmul_tflops is None:
                argv.pop()  # its option too: the script's default applies
            else:
                argv.append(f"{matmul_tflops:.1f}")
        else:
            argv.append(str(json_path) if a == "{json}" else a)
    return argv


def run_step(step: Step, results_dir: Path, log, time_left: float,
             matmul_tflops: float | None) -> dict:
    if time_left < step.min_s:
        return {"status": "skipped", "reason": f"{time_left:.0f} s of the budget left"}
    json_path = results_dir / f".{step.name}.json"
    json_path.unlink(missing_ok=True)
    argv = step_argv(step, json_path, matmul_tflops)
    limit = min(step.cap_s, time_left)
    log.write(f"\n==== {step.name} (limit {limit:.0f} s): {' '.join(argv)}\n")
    log.flush()
    began = time.perf_counter()
    env = os.environ | {"PYTHONUNBUFFERED": "1",
                        "PYTHONPATH": os.pathsep.join(
                            p for p in (str(ROOT), str(HERE), os.environ.get("PYTHONPATH"))
                            if p)} | step.env
    try:
        proc = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit:.0f} s"
    out = {"status": status, "seconds": time.perf_counter() - began}
    if json_path.is_file():
        out["result"] = json.loads(json_path.read_text())
        json_path.unlink()
    return out


def summarise(results: dict) -> list[str]:
    """The issue's targets, each with its figure, PASS / FAIL, or why it is missing."""
    steps = results["steps"]

    def result(name):
        return steps.get(name, {}).get("result")

    lines = []
    tests = steps.get("cuda_tests", {})
    lines.append(f"CUDA tests: {tests.get('status', 'not run')}")
    mm = result("matmul")
    lines.append(f"matmul {mm['size']}^3 {mm['dtype']}: {mm['tflops']:.0f} TFLOP/s" if mm
                 else "matmul: not measured")
    for name in ("label_f0", "label_f6", "label_f6_compiled"):
        r = result(name)
        if not r:
            lines.append(f"{name}: not measured ({steps.get(name, {}).get('status')})")
            continue
        c = r["config"]
        line = (f"{c['model']}@{c['input_size']}{' compiled' if c.get('compile') else ''}: "
                f"job {r['job']['loop_img_s']:.0f} img/s, bare "
                f"{r['bare']['img_s']:.0f} img/s, ratio {r['ratio_loop']:.3f} (>= 0.9 "
                f"{'PASS' if r['ratio_loop'] >= 0.9 else 'FAIL'})")
        if "fraction_of_peak" in r:
            frac = r["fraction_of_peak"]["job_loop"]
            line += f", {frac:.1%} of the matmul rate"
            if name == "label_f6":
                line += f" (>= 50 % {'PASS' if frac >= 0.5 else 'FAIL'})"
        if r.get("gpu_memory_gib"):
            line += f", peak GPU memory {r['gpu_memory_gib']['job']:.1f} GiB"
        if "bare_unfolded" in r:
            line += (f"; folding the weight standardisation: "
                     f"{r['bare_unfolded']['folded_speedup']:.3f}x the bare forward")
        if r["bare"].get("compile_s") is not None:
            line += f"; compiling took {r['bare']['compile_s']:.0f} s (bare warm-up)"
            eager = result("label_f6")
            if eager:
                line += (f"; {r['job']['loop_img_s'] / eager['job']['loop_img_s']:.3f}x the "
                         "eager job")
        if r.get("decode", {}).get("img_s"):
            line += f"; decoding alone {r['decode']['img_s']:.0f} img/s"
        lines.append(line)
    r = result("train")
    if r:
        for name, row in r["steps"].items():
            if row.get("baseline"):
                verdict = ("report only" if row["target"] is None
                           else f"<= {row['target']} {'PASS' if row['pass'] else 'FAIL'}")
                lines.append(f"train {name} / {row['baseline']}: {row['ratio']:.3f} "
                             f"({verdict}), {row['img_s']:.0f} img/s")
        for run in (r.get("loader") or {}).get("runs", []):
            lines.append(f"loader {run['workers']} workers: {run['img_s']:.0f} img/s = "
                         f"{run['vs_model']:.2f}x the model (>= 1.5 "
                         f"{'PASS' if run['pass'] else 'FAIL'})")
    else:
        lines.append(f"train: not measured ({steps.get('train', {}).get('status')})")
    r = result("shard_tasks")
    if r:
        lines.append("shard tasks: " + "; ".join(
            f"{name} {p['img_s']:.0f} img/s ({p['overhead_ms_per_shard']:+.0f} ms/shard)"
            for name, p in r["passes"].items()))
    else:
        lines.append(f"shard tasks: not measured ({steps.get('shard_tasks', {}).get('status')})")
    lines.append("service path (API + worker): not measured, no Redis server on the GPU machine")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="folder for results.json, summary.txt and log")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a CPU dry run in seconds")
    p.add_argument("--budget-s", type=float, default=420.0, help="for all steps together")
    p.add_argument("--only", default=None, help="comma-separated step names")
    p.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)  # the step itself
    p.add_argument("--size", type=int, default=8192, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.matmul:  # one step, in its own process: results is the JSON path
        args.results.write_text(json.dumps(matmul_rate(args.device, args.size)) + "\n")
        return 0

    args.results.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(args.device), "tiny": args.tiny,
               "budget_s": args.budget_s, "steps": {}}
    deadline = time.monotonic() + args.budget_s  # for the steps (the above imports torch)
    only = set(args.only.split(",")) if args.only else None
    with open(args.results / "log", "a") as log:
        for step in steps_for(args.device, args.tiny):
            name = step.name
            if only and name not in only:
                continue
            matmul = results["steps"].get("matmul", {}).get("result")
            results["steps"][name] = run_step(step, args.results, log,
                                              deadline - time.monotonic(),
                                              matmul["tflops"] if matmul else None)
            print(f"{name}: {results['steps'][name]['status']} "
                  f"({results['steps'][name].get('seconds', 0):.0f} s)", flush=True)
            (args.results / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    summary = summarise(results)
    (args.results / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0 if all(s["status"] == "ok" for s in results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
