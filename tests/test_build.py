"""setup.py's choice of what to compile: a CPU-only build with a one-line reason, never a failure."""
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_name(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LIGHTCNN_FORCE_CUDA", "CUDA_HOME", "CUDA_PATH")}
    env.update(env_extra)
    # `setup.py --name` runs the extension set-up code and prints the project name, compiling nothing.
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a visible GPU always selects the CUDA build")
def test_no_gpu_and_no_force_gives_a_cpu_build():
    r = _setup_name({"LIGHTCNN_FORCE_CUDA": "0"})
    assert r.returncode == 0, r.stderr
    assert "building the CPU kernels only" in r.stdout and "lightcnn" in r.stdout


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch to reach the toolkit check")
def test_forced_cuda_without_toolkit_gives_a_cpu_build(tmp_path):
    r = _setup_name({"LIGHTCNN_FORCE_CUDA": "1", "CUDA_HOME": str(tmp_path / "no-cuda-here"),
                     "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "no CUDA toolkit found" in r.stdout and "building the CPU kernels only" in r.stdout


@pytest.mark.slow  # three fresh torch processes
def test_gpu_check_script_quick_mode_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh --device cpu --quick runs every Python part of the GPU check at toy sizes
    (no build), writes its JSON to $OUT, prints MET/MISSED targets, and never imports jsonargparse or wandb
    (the GPU image has neither: here they are made unimportable)."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    for name in ("jsonargparse", "wandb"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('gpu_check must not import {name}')\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": f"{blocker}:{ROOT}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "must not import" not in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr, r.stdout[-3000:]
    written = sorted(p.name for p in out.iterdir())
    assert {"bench_wrn_bf16_cl_drop03.json", "bench_lrn_bf16_cl.json", "bench_fit.json", "gpu_check.log"} <= set(
        written), written
    assert "=== summary:" in r.stdout and ("MET:" in r.stdout or "MISSED:" in r.stdout)
    assert re.search(r"sanitize_ops.py: \d+ cases, 0 mismatches", r.stdout), r.stdout[-3000:]
