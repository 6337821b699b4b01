"""GradGuard under FSDP2 (fully_shard) on 2 CPU processes (gloo): statistics of the whole model from
sharded gradients, and the same skip decision on every rank."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses: every Keras backend / several ranks


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_sharded_gradients_give_whole_model_statistics(tmp_path):
    out = tmp_path / "result"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fsdp_worker.py")), str(free_port()),
                           str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads(proc.stdout.strip().splitlines()[-1])["reference_first_norm"]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    for r in ranks:
        # the global norm of the full (all-reduced, unsharded) gradient, the same on both ranks
        assert r["norms"][0] == pytest.approx(ref, rel=1e-4)
        assert r["stepped"] == [True] * 5 + [False] + [True] * 4  # rank 1's NaN skipped the step everywhere
        assert r["finite"] and r["skipped"] == 1 and "nonfinite" in r["findings"]
        assert r["layers"] == ["0", "2", "4"] and r["numel"] == [16 * 32 + 32, 32 * 32 + 32, 32 * 4 + 4]
    assert ranks[0]["norms"] == ranks[1]["norms"]
    # the update the optimizer applied is measured from the local shards (it came back NaN on every log
    # step before: the sharded layout's sample views are rebuilt on each use)
    logged = [r["update_to_weight"] for r in ranks if r["update_to_weight"]]
    assert logged, "no rank logged"
    for values in logged:  # every log step that stepped, each of the 3 layers: finite, a fraction of the weights
        assert len(values) >= 9 and all(0 < v < 1 for v in values), values
