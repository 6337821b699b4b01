"""gradguard.tensorboard with real event files, read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

import io
import warnings
import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from gradguard.tensorboard import TensorBoardSink  # noqa: E402
from gradguard.torch import GradGuard  # noqa: E402

from nets import digits, mlp  # noqa: E402

SPIKE_AT, STEPS, EVERY = 13, 30, 5


def read(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def train(sink, steps=STEPS):
    """A sigmoid MLP (vanishing) with a loss spike at SPIKE_AT, between two log steps."""
    torch.manual_seed(0)
    model = mlp(6, nn.Sigmoid, width=16)
    x, y = digits(256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard(model, clip="auto", log_every_n_steps=EVERY, sinks=[sink])
    true = []
    for step in range(steps):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x[:64]), y[:64]) * (1e4 if step == SPIKE_AT else 1.0)).backward()
        true.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
        guard.step(opt)
    findings = guard.findings
    guard.close()
    return model, findings, true


def test_scalars_every_step_histograms_heatmap_and_findings_reach_the_event_files(tmp_path):
    model, findings, true = train(TensorBoardSink(tmp_path / "tb", heatmap_every=2))
    acc = read(tmp_path / "tb")
    tags = acc.Tags()

    norms = acc.Scalars("grad/norm/global")
    assert [e.step for e in norms] == [4, 9, 14, 19, 24, 29]
    assert [e.value for e in norms] == pytest.approx([true[s] for s in (4, 9, 14, 19, 24, 29)], rel=1e-5)
    assert "grad/depth_ratio" in tags["scalars"] and "gradguard/skipped_steps" in tags["scalars"]

    every = acc.Scalars("grad/norm/global_every_step")
    assert [e.step for e in every] == list(range(STEPS))
    assert [e.value for e in every] == pytest.approx(true, rel=1e-5)
    assert max(every, key=lambda e: e.value).step == SPIKE_AT  # the spike, at its own step
    assert acc.Scalars("gradguard/clip_threshold_every_step")[0].step == SPIKE_AT  # clipping switched on there

    hist = acc.Histograms("grad/hist/0")
    assert [h.step for h in hist] == [4, 9, 14, 19, 24, 29]
    first = model[0]
    assert hist[-1].histogram_value.num == first.weight.numel() + first.bias.numel()

    images = acc.Images("gradguard/gradient_flow")
    assert [i.step for i in images] == [9, 19, 29]  # every 2nd log step; the last one already drawn
    from matplotlib.image import imread

    img = imread(io.BytesIO(images[-1].encoded_image_string), format="png")
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.shape[0] == images[-1].height

    kinds = {f.kind for f in findings}
    assert "vanishing" in kinds and "exploding" in kinds
    for kind in kinds:
        events = acc.Tensors(f"gradguard/finding/{kind}")
        text = events[-1].tensor_proto.string_val[0].decode()
        f = next(f for f in findings if f.kind == kind)
        assert f"{f.severity.upper()} {kind}" in text and f.remedies[0] in text and "Remedies:" in text


def test_an_existing_summary_writer_is_used_as_it_is(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    train(TensorBoardSink(writer=writer, scalars=False, heatmap_every=1), steps=12)
    writer.add_scalar("user/loss", 1.0, 11)  # the sink did not close the user's writer
    writer.close()
    acc = read(tmp_path / "tb")
    assert "grad/norm/global" not in acc.Tags()["scalars"]  # scalars=False: the host's logger has them
    assert [e.step for e in acc.Scalars("grad/norm/global_every_step")] == list(range(12))
    assert [h.step for h in acc.Histograms("grad/hist/0")] == [4, 9]
    assert [i.step for i in acc.Images("gradguard/gradient_flow")] == [4, 9, 11]  # + close
    assert "user/loss" in acc.Tags()["scalars"]


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="log_dir or writer"):
        TensorBoardSink()
    with pytest.raises(ValueError, match="log_dir or writer"):
        TensorBoardSink(tmp_path, writer=object())
    with pytest.raises(TypeError, match="writer must be a SummaryWriter"):
        TensorBoardSink(writer=object())
    with pytest.raises(ValueError, match="heatmap_every"):
        TensorBoardSink(tmp_path, heatmap_every=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="log_dir="):
        TensorBoardSink(tmp_path / "file" / "sub")


def test_lightning_tensorboard_logger_gets_histograms_every_step_and_the_heatmap(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from gradguard.lightning import GradGuardCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = mlp(8, nn.Sigmoid, width=16)  # vanishing: a finding to write

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = digits(320)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=[GradGuardCallback(log_every_n_steps=5)],
                         accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, log_every_n_steps=5, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(), DataLoader(TensorDataset(x, y), batch_size=16))
    assert not [w for w in caught if "sink" in str(w.message)]  # no sink failed
    acc = read(logger.log_dir)
    tags = acc.Tags()
    assert "grad/norm/global" in tags["scalars"]  # through the Trainer's logger, once
    assert [e.step for e in acc.Scalars("grad/norm/global_every_step")] == list(range(20))
    assert [h.step for h in acc.Histograms("grad/hist/net.0")] == [4, 9, 14, 19]
    assert acc.Images("gradguard/gradient_flow")  # drawn at the end of training
    assert any(t.startswith("gradguard/finding/") for t in tags["tensors"])
