"""gradguard in a PyTorch Lightning run on scikit-learn's digits, logged to W&B in offline mode.

    python examples/lightning_digits.py                      # deep sigmoid MLP: its early layers collapse
    python examples/lightning_digits.py --model bad-init     # exploding init: clip="auto" switches on at the
                                                             # first spike (compare --clip none: NaN steps, skipped)
    python examples/lightning_digits.py --model relu --poison-step 20   # a NaN batch, skipped

The W&B run is written offline under --out (nothing leaves the machine; ``wandb sync <run dir>`` uploads it
later). Scalars (grad/norm/global, grad/depth_ratio, gradguard/...) reach W&B through the WandbLogger like
any ``self.log``; histograms, the gradient-flow heatmap, alerts and the findings in the run summary come
from gradguard.wandb. The findings are printed at the end.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits(batch_size: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x / 16.0, y, test_size=0.2, random_state=0)

    def loader(x, y, shuffle):
        data = TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle)

    return loader(x_train, y_train, True), loader(x_val, y_val, False)


def make_net(kind: str) -> nn.Sequential:
    depth, act = {"sigmoid": (16, nn.Sigmoid), "relu": (4, nn.ReLU), "bad-init": (4, nn.ReLU)}[kind]
    layers, d = [], 64
    for _ in range(depth):
        layers += [nn.Linear(d, 64), act()]
        d = 64
    net = nn.Sequential(*layers, nn.Linear(d, 10))
    for m in net.modules():
        if isinstance(m, nn.Linear) and kind == "relu":
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.Linear) and kind == "bad-init":
            nn.init.normal_(m.weight, std=0.45)  # ~2.5x He: activations and gradients grow layer by layer
    return net


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["sigmoid", "relu", "bad-init"], default="sigmoid")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--clip", default="auto", help='"auto", "zscore", "none" or a max global norm')
    p.add_argument("--poison-step", type=int, default=None, help="feed a NaN batch at this batch index")
    p.add_argument("--out", default="runs/lightning_digits")
    args = p.parse_args(argv)

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.makedirs(args.out, exist_ok=True)
    import pytorch_lightning as pl
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    from gradguard.lightning import GradGuardCallback

    clip = None if args.clip == "none" else args.clip if args.clip in ("auto", "zscore") else float(args.clip)

    class DigitsClassifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net(args.model)

        def training_step(self, batch, batch_idx):
            x, y = batch
            if args.poison_step is not None and self.global_step == args.poison_step:
                x = x * float("nan")  # a corrupted batch: gradguard skips this optimizer step
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val/acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=args.lr)

    torch.manual_seed(0)
    train, val = digits(batch_size=32)
    logger = WandbLogger(project="gradguard-examples", name=f"lightning-digits-{args.model}", save_dir=args.out,
                         offline=True, settings=wandb.Settings(console="off", x_disable_stats=True))
    guard = GradGuardCallback(clip=clip)  # logs every Trainer(log_every_n_steps) optimizer steps
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[guard], logger=logger, log_every_n_steps=10,
                         default_root_dir=args.out, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="gradguard")  # printed below instead
        trainer.fit(DigitsClassifier(), train, val)
    run_dir = logger.experiment.dir
    wandb.finish()

    acc = trainer.callback_metrics.get("val/acc")
    print(f"\nmodel={args.model} clip={clip!r}: {trainer.global_step} optimizer steps, "
          f"{guard.skipped_steps} skipped, validation accuracy {float(acc) if acc is not None else float('nan'):.3f}")
    print(f"weights finite: {all(bool(torch.isfinite(p).all()) for p in trainer.lightning_module.parameters())}")
    if not guard.findings:
        print("gradguard: no findings, the gradients look healthy")
    for f in guard.findings:
        print(f"\n{f}")
        for remedy in f.remedies[:3]:
            print(f"  - {remedy}")
    print(f"\noffline W&B run: {os.path.dirname(run_dir)} (upload with: wandb sync {os.path.dirname(run_dir)})")
    return guard


if __name__ == "__main__":
    main()
