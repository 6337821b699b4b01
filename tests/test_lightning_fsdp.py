"""GradGuardCallback under Lightning's sharding strategies, 2 CPU processes (gloo).

ModelParallelStrategy (FSDP2, DTensor parameters) runs on CPU: statistics and decisions come from the
whole model's gradients, the same on every rank, equal to a single-process run. FSDPStrategy (FSDP1)
needs a GPU in Lightning itself (shown below); the callback refuses it at setup."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses: every Keras backend / several ranks

torch = pytest.importorskip("torch")
pl = pytest.importorskip("pytorch_lightning")


def test_model_parallel_strategy_gives_whole_model_norms_on_every_rank(tmp_path):
    out = tmp_path / "result"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("lightning_fsdp_worker.py")), "model_parallel",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    reference = json.loads([l for l in proc.stdout.splitlines() if l.startswith('{"reference"')][-1])["reference"]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    for r in ranks:
        # step 0: per-layer and global norms of the full gradient, not of this rank's shard
        assert r["norms"][0] == pytest.approx(reference, rel=1e-5)
        assert r["layers"] == ["net.0", "net.2", "net.4"] and r["numel"] == [16 * 32 + 32, 32 * 32 + 32, 32 * 4 + 4]
        # gradguard's clip= on sharded gradients: the whole gradient's norm is cut to 0.3 where it was above
        raw = [n[-1] for i, n in enumerate(r["norms"]) if i != 3]
        assert len(r["clipped"]) == len(raw)  # the skipped step reached the optimizer with no gradients
        for before, after in zip(raw, r["clipped"]):
            assert after == pytest.approx(min(before, 0.3), rel=1e-4)
        assert r["skipped"] == 1 and "nonfinite" in r["findings"] and r["finite"]  # rank 1's NaN, skipped everywhere
    assert ranks[0]["norms"][:3] == ranks[1]["norms"][:3]  # bit-identical on both ranks
    assert ranks[0]["norms"][4:] == ranks[1]["norms"][4:]


def test_lightning_refuses_fsdp_strategy_on_cpu():
    """Lightning's FSDPStrategy (FSDP1) will not run on CPU, so it cannot be tested here; the same
    gradguard sharding path (sums over the shard group) is covered by ModelParallelStrategy above and by
    torch's fully_shard directly in test_torch_distributed.py."""
    from pytorch_lightning.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy())
