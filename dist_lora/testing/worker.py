"""Worker process of :func:`dist_lora.testing.multiprocess.launch` (``python -m`` entry point).

Usage: ``python -m dist_lora.testing.worker MODULE WORKDIR`` with torchrun-style environment
variables. Imports MODULE (which registers its checks), then for each layout in order of first
appearance re-initialises the parallel state and runs that layout's checks, writing each
verdict to ``WORKDIR/results_rank<R>.json`` as soon as it is known.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

import torch

from dist_lora.parallel import initialize, reseed, shutdown
from dist_lora.parallel.collectives import all_reduce_
from dist_lora.parallel.device import collective_device
from dist_lora.testing.multiprocess import Context, checks_of


def main(module_name: str, workdir: str) -> int:
    import os

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    work = Path(workdir)
    importlib.import_module(module_name)
    checks = checks_of(module_name)
    layouts = list(dict.fromkeys(layout for c in checks for layout in c.layouts))
    data = json.loads((work / "data.json").read_text())
    results: dict[str, dict] = {}
    out = work / f"results_rank{rank}.json"
    state: dict = {}
    for layout in layouts:
        try:
            groups = initialize(tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
                                sequence_parallel=layout.sp, seed=1234, expert_parallel=layout.ep,
                                expert_tensor_parallel=layout.etp, backend=os.environ.get("DIST_LORA_TEST_BACKEND") or None)
        except Exception:  # noqa: BLE001 - reported as the cases' failure
            error = traceback.format_exc()
            for c in checks:
                if layout in c.layouts:
                    results[f"{c.name}[{layout.name}]"] = {"ok": False, "error": error}
            out.write_text(json.dumps(results))
            continue
        for c in checks:
            if layout not in c.layouts:
                continue
            case = f"{c.name}[{layout.name}]"
            ctx = Context(groups=groups, layout=layout, data=data, tmp=work, world_size=world, state=state)
            reseed(1234)  # every check starts from the same random streams, whatever ran before
            try:
                c.func(ctx)
                results[case] = {"ok": True, "error": ""}
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # noqa: BLE001 - a failing check (pytest.fail too) is a result, not a crash
                results[case] = {"ok": False, "error": traceback.format_exc()}
            out.write_text(json.dumps(results))
            all_reduce_(torch.zeros(1, device=collective_device()))  # keep the ranks in step between checks
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
