"""Run by test_lightning_fsdp.py: GradGuardCallback under a Lightning sharding strategy on 2 CPU processes
(gloo). ``python lightning_fsdp_worker.py STRATEGY OUT``; each rank writes OUT.<rank> as JSON."""

import json
import sys
import warnings

import torch
from torch import nn

import pytorch_lightning as pl
from gradguard.lightning import GradGuardCallback

STEPS = 6
CLIP = 0.3  # below the first step's global norm (0.47): gradguard clips the sharded gradients


def model_and_data(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, 2, 8, 16, generator=g)  # step, rank, batch, features
    ys = torch.randint(0, 4, (STEPS, 2, 8), generator=g)
    return net, xs, ys


class Net(pl.LightningModule):
    def __init__(self, shard_in_configure_model: bool):
        super().__init__()
        self.net, self.xs, self.ys = model_and_data()
        self.shard = shard_in_configure_model
        self.norms = []

    def configure_model(self):
        if self.shard:  # ModelParallelStrategy: the user applies FSDP2 with the strategy's mesh
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for m in self.net:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        rank = self.global_rank
        x = self.xs[batch_idx, rank].clone()
        if batch_idx == 3 and rank == 1:
            x[0, 0] = float("nan")
        return nn.functional.cross_entropy(self.net(x), self.ys[batch_idx, rank])

    def on_before_optimizer_step(self, optimizer):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.arange(STEPS), batch_size=1)


class ReadNorm(pl.Callback):
    """After GradGuardCallback's on_before_optimizer_step: the step's global norm from the engine."""

    def __init__(self, guard):
        self.guard, self.norms, self.clipped = guard, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append([float(v) for v in self.guard.engine.state["acc_last"]])  # per layer, then global
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:  # the norm of the whole (sharded) gradient the optimizer gets, after gradguard clipped it
            total = torch.nn.utils.get_total_norm(grads)
            self.clipped.append(float(total.full_tensor() if hasattr(total, "full_tensor") else total))


def reference_norms():
    """Step 0 on one process (the mean of both ranks' losses is what the sharded run differentiates):
    per-layer gradient norms of the Linear layers, then the global norm."""
    net, xs, ys = model_and_data()
    loss = sum(nn.functional.cross_entropy(net(xs[0, r]), ys[0, r]) for r in range(2)) / 2
    loss.backward()
    layers = [torch.sqrt(m.weight.grad.square().sum() + m.bias.grad.square().sum()) for m in net
              if isinstance(m, nn.Linear)]
    return [float(v) for v in layers] + [float(torch.norm(torch.stack(layers)))]


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    name, out = sys.argv[1], sys.argv[2]
    if name == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy

        strategy = FSDPStrategy(auto_wrap_policy={nn.Linear}, process_group_backend="gloo")
    else:
        from pytorch_lightning.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    guard = GradGuardCallback(clip=CLIP, log_every_n_steps=2)
    reader = ReadNorm(guard)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, callbacks=[guard, reader],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    module = Net(shard_in_configure_model=name != "fsdp")
    trainer.fit(module)
    rank = trainer.global_rank
    engine = guard.engine
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"norms": reader.norms, "clipped": reader.clipped, "skipped": guard.skipped_steps, "findings": [f.kind for f in guard.findings],
                   "layers": [l.name for l in engine.layers], "numel": [l.numel for l in engine.layers],
                   "finite": all(bool(torch.isfinite(p.detach().full_tensor() if hasattr(p, "full_tensor") else p).all())
                                 for p in module.parameters())}, f)
    if rank == 0:
        print(json.dumps({"reference": reference_norms()}))
