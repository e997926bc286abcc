"""Run by tests/parallel/test_slurm_steps.py on the two-node cluster: start the process group from
the launcher's environment, all-reduce rank + 1, and write what happened to OUT/NAME.<SLURM_PROCID>.json.

    python tests/parallel/rendezvous_probe.py OUT NAME [HOLD_S]

With HOLD_S, rank 0 writes its rendezvous port to OUT/NAME.ready and the ranks keep the process
group (and so the store) up until OUT/NAME.release appears (HOLD_S at most), for the test that
starts a second step on the same port.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

from dist_lora import parallel
from dist_lora.parallel.collectives import all_reduce_


def main(out: str, name: str, hold_s: float = 0.0) -> int:
    record = {"procid": os.environ.get("SLURM_PROCID"), "host": socket.gethostname()}
    began = time.monotonic()
    try:
        groups = parallel.initialize()
        env = parallel.detect()
        total = all_reduce_(torch.ones(1) * (groups.rank + 1)).item()
        record.update(rank=groups.rank, world=groups.world_size, total=total, master_addr=env.master_addr,
                      master_port=env.master_port, gloo_ifname=os.environ.get("GLOO_SOCKET_IFNAME"))
        if hold_s:
            if groups.rank == 0:
                Path(out, f"{name}.ready").write_text(str(env.master_port))
            deadline = time.monotonic() + hold_s
            while not Path(out, f"{name}.release").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        all_reduce_(torch.zeros(1))
        parallel.shutdown()
        code = 0
    except Exception as err:  # noqa: BLE001 - the test reads the error
        record.update(error=f"{type(err).__name__}: {err}")
        print(record["error"], file=sys.stderr, flush=True)
        code = 2
    record["seconds"] = time.monotonic() - began
    Path(out, f"{name}.{record['procid']}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0))
