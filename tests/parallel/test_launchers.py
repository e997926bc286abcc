"""``parallel.initialize`` under real launchers: torchrun and MPICH's mpiexec (rank 0 picks a free
loopback port and broadcasts it with mpi4py). Each launch is wrapped in a timeout."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
import torch
from dist_lora import parallel
from dist_lora.parallel.collectives import all_gather_object, all_reduce_
g = parallel.initialize(tensor_parallel=2)
total = all_reduce_(torch.ones(1) * (g.rank + 1)).item()
row = [g.rank, g.world_size, g.local_rank, g.launcher, total, all_gather_object(g.tp_rank)]
open(f"{sys.argv[1]}/rank{g.rank}.txt", "w").write(repr(row))
parallel.shutdown()
"""


def _run(cmd, tmp_path):
    script = tmp_path / "init.py"
    script.write_text(SCRIPT)
    out = subprocess.run([*cmd, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [ast.literal_eval(p.read_text()) for p in sorted(tmp_path.glob("rank*.txt"))]


def test_torchrun(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    rows = _run([str(torchrun), "--standalone", "--nproc_per_node=2"], tmp_path)
    assert rows == [[0, 2, 0, "torchrun", 3.0, [0, 1]], [1, 2, 1, "torchrun", 3.0, [0, 1]]]


def test_mpiexec(tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists() and shutil.which("mpiexec") is None:
        pytest.skip("no mpiexec: install the 'mpi' extra (pip install 'dist-lora[mpi]')")
    pytest.importorskip("mpi4py")
    rows = _run([str(mpiexec if mpiexec.exists() else shutil.which("mpiexec")), "-n", "2", sys.executable], tmp_path)
    assert rows == [[0, 2, 0, "mpi", 3.0, [0, 1]], [1, 2, 1, "mpi", 3.0, [0, 1]]]
