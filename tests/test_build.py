"""setup.py's choice of what to compile: a CPU-only build with a one-line reason, never a failure."""
import os
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
