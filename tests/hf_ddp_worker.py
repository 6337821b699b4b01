"""One rank of the 2-process DDP test of gradguard.transformers (run by torchrun, gloo on CPU)."""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer

from gradguard.transformers import GradGuardCallback
from hf_cases import json_text_dataset, tiny_llama, training_args

out = sys.argv[1]
model = tiny_llama()
calls = {"n": 0}


def poison_on_rank_one(module, args, output):
    calls["n"] += 1
    return output * float("nan") if calls["n"] == 4 and dist.get_rank() == 1 else output


model.model.layers[0].mlp.register_forward_hook(poison_on_rank_one)
cb = GradGuardCallback(clip="auto")
args = training_args(out + "/run", max_steps=10, per_device_train_batch_size=4, max_grad_norm=0.0,
                     ddp_backend="gloo", ddp_find_unused_parameters=False)
trainer = Trainer(model=model, args=args, train_dataset=json_text_dataset(), callbacks=[cb])
trainer.train()
rank = dist.get_rank()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"world_size": dist.get_world_size(), "totals": cb.totals,
               "weights": [float(p.detach().double().sum()) for p in model.parameters()],
               "logged_norm": [r["grad/norm/global"] for r in trainer.state.log_history if "grad/norm/global" in r]}, f)
# Without this, gloo's worker threads can outlive the interpreter and abort the process at exit
# ("terminate called without an active exception", SIGABRT): pytorch/pytorch#190489.
dist.barrier()
dist.destroy_process_group()
# The same abort has been seen after destroy_process_group in the FSDP worker: the results are on
# disk, so leave without running C++ static destructors.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
