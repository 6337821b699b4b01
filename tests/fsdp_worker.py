"""Run by test_torch_distributed.py: GradGuard on a 2-process FSDP2 (fully_shard) model over gloo.

Each rank trains on its own batches; at step 5 rank 1's batch holds a NaN. Prints one JSON line per rank.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(10, 2, 8, 16, generator=g)  # step, rank, batch, features
    ys = torch.randint(0, 4, (10, 2, 8), generator=g)
    return model, xs, ys


def work(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    warnings.simplefilter("ignore")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gradguard.sinks import Sink
    from gradguard.torch import GradGuard

    mesh = init_device_mesh("cpu", (2,))
    model, xs, ys = model_and_data()
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    updates = []  # the logged update-to-weight ratios (the logging rank's sink)

    class Updates(Sink):
        def log(self, record):
            updates.extend(v for k, v in record.scalars.items() if k.startswith("grad/update_to_weight/"))

    guard = GradGuard(model, clip=0.5, log_every_n_steps=2, sinks=[Updates()])
    norms, stepped = [], []
    for step in range(10):
        x = xs[step, rank].clone()
        if step == 5 and rank == 1:
            x[0, 0] = float("nan")
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), ys[step, rank]).backward()
        ok = guard.engine.before_step()  # what guard.step(opt) does, with the step's global norm read between
        norms.append(float(guard.engine.state["acc_last"][-1]))
        if ok:
            opt.step()
        guard.engine.after_step(ok)
        stepped.append(ok)
    local = torch.cat([p.to_local().detach().reshape(-1) for p in model.parameters()])
    finite = bool(torch.isfinite(local).all())
    result = {"rank": rank, "stepped": stepped, "norms": norms, "finite": finite,
              "findings": [f.kind for f in guard.findings], "skipped": guard.skipped_steps,
              "layers": [l.name for l in guard.layers], "numel": [l.numel for l in guard.layers],
              "update_to_weight": updates}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    # Both ranks done with every collective before either tears the group down (a rank that left
    # early has aborted the other at exit under load: "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    # Even then gloo's threads have aborted a rank at interpreter exit (once in a full local run, CPU
    # under load): the results are on disk, so leave without running C++ static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def reference_first_norm():
    """Step 0 on one process: the mean of both ranks' losses is what FSDP differentiates."""
    model, xs, ys = model_and_data()
    loss = sum(nn.functional.cross_entropy(model(xs[0, r]), ys[0, r]) for r in range(2)) / 2
    loss.backward()
    return float(torch.norm(torch.stack([p.grad.norm() for p in model.parameters()])))


if __name__ == "__main__":
    port, out = int(sys.argv[1]), sys.argv[2]
    mp.spawn(work, args=(port, out), nprocs=2)
    print(json.dumps({"reference_first_norm": reference_first_norm()}))
