"""Each detector at the core level: windows built by the real device-side step (``stats.device_step``)
from chosen per-step gradient norms, snapshots built from chosen values, judged by a real ``Monitor``;
then a few tiny real torch runs where the physics needs a real network (a healthy large-batch tanh MLP
with a transient burst, a batch-size-1 net, an LSTM that learns)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import gradguard
from gradguard import clipping, stats
from gradguard.detectors import DetectorConfig
from gradguard.ops import numpy_ops as xp


def make_layers(n, units=32, numel=1000):
    return [gradguard.LayerInfo(f"l{i}", "Linear", numel, fan_in=numel // units, units=units) for i in range(n)]


class Run:
    """Drives the device-side step and the monitor the way an adapter does: every step through
    ``device_step``; on log steps (step 0 and every ``log_every``-th) one ``WindowStats`` plus the
    snapshot the test supplies for that step."""

    def __init__(self, n_layers=4, log_every=10, policy=None, config=None, layers=None):
        self.layers = layers or make_layers(n_layers)
        self.n = len(self.layers)
        self.policy = policy or clipping.no_clipping()
        self.monitor = gradguard.Monitor(self.layers, policy_name=self.policy.name, config=config)
        self.state = stats.init_state(self.n, self.policy)
        self.log_every = log_every
        self.step = 0

    def advance(self, global_norms, layer_share=None, snapshot=None, zero_layers=()):
        """One optimizer step per entry of ``global_norms``. ``snapshot(step)`` -> Snapshot or None."""
        share = np.full(self.n, 1.0 / self.n) if layer_share is None else np.asarray(layer_share, np.float64)
        for g in global_norms:
            sq = (np.float64(g) ** 2 * share).astype(np.float32)
            for i in zero_layers:
                sq[i] = 0.0
            has = np.ones(self.n, np.float32)
            _, _, self.state = stats.device_step(self.state, sq, has, self.policy, xp)
            if self.step == 0 or (self.step + 1) % self.log_every == 0:
                window = stats.WindowStats.from_state(self.state, last_step=self.step)
                self.state.update(stats.reset_window(self.n))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.monitor.observe(window, snapshot(self.step) if snapshot else None)
            self.step += 1
        return self

    def kinds(self):
        return {f.kind: f for f in self.monitor.findings}


def updates(ratio_at, weight=10.0, n=4):
    """Snapshots whose applied update is ``ratio_at(step)`` times the weights' norm."""
    def snap(step):
        w = np.full(n, weight / math.sqrt(n))
        return stats.Snapshot(weight_norm=w, update_norm=w * ratio_at(step))
    return snap


def noisy(level, steps, rng, spread=0.3):
    return list(level * np.exp(rng.normal(0.0, spread, steps)))


# ------------------------------------------------------------------------------- exploding

def test_a_burst_that_returns_with_small_updates_is_not_exploding():
    # The held-out tanh MLP: 68x over the running level for 2 steps late in training, the optimizer's
    # update 0.3% of the weights throughout, the norm back at its level afterwards.
    rng = np.random.default_rng(0)
    norms = noisy(1.0, 924, rng, 0.2) + [68.0, 60.0] + noisy(1.0, 100, rng, 0.2)
    run = Run(log_every=50).advance(norms, snapshot=updates(lambda s: 0.003))
    assert run.monitor.totals["explosions"] >= 1  # the device-side tracker did see it (clipping protects)
    assert "exploding" not in run.kinds()


@pytest.mark.parametrize("log_every", [1, 10, 50])
def test_recurrent_bursts_are_not_exploding(log_every):
    # An LSTM's bursts: 3-5 steps at 10-40x every ~60 steps, the run goes on learning.
    rng = np.random.default_rng(1)
    norms = []
    for k in range(8):
        norms += noisy(0.5, 55, rng, 0.3) + list(0.5 * np.array([12.0, 30.0, 40.0, 20.0][: 3 + k % 2]))
    run = Run(log_every=log_every).advance(norms, snapshot=updates(lambda s: 0.002))
    assert "exploding" not in run.kinds()


def test_sustained_growth_that_the_optimizer_applies_is_exploding_at_the_step_it_was_established():
    # SGD: the norm takes off at step 300 and grows 1.6x a step; the applied update grows with it.
    rng = np.random.default_rng(2)
    norms = noisy(1.0, 300, rng, 0.1) + [1.6 ** k * 20 for k in range(1, 51)]
    ratio = lambda s: 0.002 if s < 300 else 0.002 * 1.6 ** (s - 299)
    run = Run(log_every=50).advance(norms, snapshot=updates(ratio))
    f = run.kinds()["exploding"]
    start = 300
    assert start <= f.step <= start + DetectorConfig().explosion_sustain_steps
    assert f.severity == "critical" and "stayed far above" in f.message


def test_an_elevated_norm_that_adam_absorbs_is_not_exploding():
    # The gradient sits 30x higher for 40 steps (a hard phase of the data), but Adam's update, measured
    # while it is elevated, stays at the run's ordinary 0.1%: nothing feeds on itself.
    rng = np.random.default_rng(3)
    norms = noisy(1.0, 200, rng, 0.1) + noisy(30.0, 40, rng, 0.1) + noisy(1.0, 60, rng, 0.1)
    run = Run(log_every=10).advance(norms, snapshot=updates(lambda s: 0.001))
    assert "exploding" not in run.kinds()


def test_overflow_after_a_spike_is_exploding_at_the_overflow():
    rng = np.random.default_rng(4)
    norms = noisy(1.0, 120, rng, 0.1) + [50.0, float("inf")] + noisy(1.0, 28, rng, 0.1)
    run = Run(log_every=50).advance(norms)
    kinds = run.kinds()
    assert kinds["exploding"].step == 121 and kinds["exploding"].severity == "critical"
    assert kinds["nonfinite"].step == 121 and kinds["nonfinite"].cause == "exploding gradients overflowed"


def test_nan_without_growth_is_nonfinite_only():
    rng = np.random.default_rng(5)
    norms = noisy(1.0, 130, rng, 0.1) + [float("nan")] + noisy(1.0, 69, rng, 0.1)
    run = Run(log_every=50).advance(norms)
    assert set(run.kinds()) == {"nonfinite"} and run.kinds()["nonfinite"].step == 130


def test_an_update_larger_than_the_weights_is_exploding_at_once():
    run = Run(log_every=50).advance([1.0] * 100, snapshot=updates(lambda s: 2.5 if s == 49 else 0.001))
    f = run.kinds()["exploding"]
    assert f.step == 49 and f.severity == "critical"


def test_one_large_update_alone_is_not_exploding_but_one_the_weights_run_away_from_is():
    calm = Run(log_every=50).advance([1.0] * 150, snapshot=updates(lambda s: 0.5 if s == 0 else 0.002))
    assert "exploding" not in calm.kinds()

    def grows(step):  # a 50% step at step 0, after which the weights' norm triples
        w = np.full(4, (10.0 if step == 0 else 30.0) / 2)
        return stats.Snapshot(weight_norm=w, update_norm=w * (0.5 if step == 0 else 0.005))
    run = Run(log_every=50).advance([1.0] * 100, snapshot=grows)
    f = run.kinds()["exploding"]
    assert f.step == 49 and "grown 3x" in f.message


@pytest.mark.parametrize("log_every", [1, 10, 50])
def test_slow_divergence_after_hundreds_of_healthy_steps(log_every):
    # Healthy for 400 steps, then 1.03x a step (too slow for any single jump) with the update in step.
    rng = np.random.default_rng(6)
    norms = noisy(1.0, 400, rng, 0.2) + [1.03 ** k * float(np.exp(rng.normal(0, 0.2))) for k in range(1, 251)]
    ratio = lambda s: 0.002 * (1.02 ** max(0, s - 400))  # stays under update_ratio_warning throughout
    run = Run(log_every=log_every).advance(norms, snapshot=updates(ratio))
    f = run.kinds()["exploding"]
    assert 400 + 150 <= f.step <= 650  # 100x over the floor needs ~156 steps of 1.03x; no jump to see earlier
    assert "kept rising" in f.message


@pytest.mark.parametrize("log_every", [10, 50])
def test_weights_that_run_away_while_the_gradient_cannot_grow_are_exploding(log_every):
    # Keras on JAX, lr ramping after 300 healthy steps: the gradient stays at its level (a bounded loss;
    # later an exactly zero gradient from a saturated softmax) while the weights' norm goes 19 -> 112
    # in 50 steps and the applied update is 10x the run's quietest.
    rng = np.random.default_rng(16)
    norms = noisy(1.0, 600, rng, 0.2)
    weight = lambda s: 10.0 * (1.0 if s < 400 else 1.04 ** (s - 400))  # doubles in ~18 steps

    def snap(step):
        w = np.full(4, weight(step) / 2)
        return stats.Snapshot(weight_norm=w, update_norm=w * (0.002 if step < 400 else 0.03))
    run = Run(log_every=log_every).advance(norms, snapshot=snap)
    f = run.kinds()["exploding"]
    assert 400 < f.step <= 400 + 18 + log_every + 1 and "weights' norm grew" in f.message


def test_weights_that_double_with_ordinary_updates_are_not_exploding():
    # A frozen backbone joins the layers at step 300 (the total weight norm doubles between two log
    # steps), trained at the run's ordinary update size: nothing runs away.
    rng = np.random.default_rng(17)

    def snap(step):
        w = np.full(4, (10.0 if step < 300 else 25.0) / 2)
        return stats.Snapshot(weight_norm=w, update_norm=w * 0.002)
    run = Run(log_every=50).advance(noisy(1.0, 600, rng, 0.2), snapshot=snap)
    assert "exploding" not in run.kinds()


def test_a_gradient_that_falls_and_recovers_is_not_divergence():
    # SGD: the norm falls 300x as the loss goes to zero, then rises back towards its early level
    # (e.g. a learning-rate restart); the update follows the gradient. Not a divergence.
    rng = np.random.default_rng(15)
    down = [10.0 * 0.97 ** k for k in range(190)]
    up = [down[-1] * 1.03 ** k for k in range(1, 200)]  # ends about 2x its early level
    norms = [v * float(np.exp(rng.normal(0, 0.1))) for v in down + up]
    run = Run(log_every=10).advance(norms, snapshot=updates(lambda s: 0.002 * norms[s] / 10.0))
    assert "exploding" not in run.kinds()


def test_healthy_noise_and_a_slow_decline_are_not_exploding():
    rng = np.random.default_rng(7)
    norms = [10.0 * 0.995 ** k * float(np.exp(rng.normal(0, 0.5))) for k in range(800)]
    run = Run(log_every=10).advance(norms, snapshot=updates(lambda s: 0.003))
    assert run.monitor.findings == []


# ------------------------------------------------------------------------------- dead

def dead_snapshots(n_units, rng, silent_p, dead_idx=(), whole_zero=False, n_layers=4, layer=1):
    """Snapshots where each live unit of ``layer`` is silent with probability ``silent_p`` (a batch
    of one: ~0.5; a large batch: ~0) and the units ``dead_idx`` always are."""
    def snap(step):
        masks = [np.zeros(n_units, bool) for _ in range(n_layers)]
        m = rng.random(n_units) < silent_p
        m[list(dead_idx)] = True
        masks[layer] = np.ones(n_units, bool) if whole_zero else m
        return stats.Snapshot(dead_units=masks)
    return snap


@pytest.mark.parametrize("log_every", [1, 10, 50])
@pytest.mark.parametrize("silent_p", [0.5, 0.8])
def test_batch_of_one_silent_units_are_not_dead(log_every, silent_p):
    # With one sample per step about half of the ReLUs are silent on any step, a different half each
    # time; in a net that is not learning, most units are silent on most samples.
    rng = np.random.default_rng(8)
    run = Run(log_every=log_every).advance([1.0] * 500, snapshot=dead_snapshots(32, rng, silent_p))
    assert "dead" not in run.kinds()


@pytest.mark.parametrize("log_every", [1, 10, 50])
def test_units_silent_far_beyond_the_runs_noise_are_dead(log_every):
    rng = np.random.default_rng(9)
    dead_idx = range(20)  # 20 of 32 units always silent, the others alive on a large batch
    run = Run(log_every=log_every).advance([1.0] * 300, snapshot=dead_snapshots(32, rng, 0.02, dead_idx))
    f = run.kinds()["dead"]
    assert f.layers == ("l1",) and f.evidence["dead_fraction"]["l1"] == pytest.approx(20 / 32)
    cfg = DetectorConfig()
    # established once the streak spans dead_min_steps (and enough snapshots), whatever the log frequency
    assert cfg.dead_min_steps - 1 <= f.step <= max(cfg.dead_min_steps, log_every * (cfg.dead_snapshots + 1)) + 1


def test_batch_of_one_dead_units_are_found_with_a_longer_streak():
    rng = np.random.default_rng(10)
    run = Run(log_every=10).advance([1.0] * 600, snapshot=dead_snapshots(32, rng, 0.5, range(24)))
    f = run.kinds()["dead"]
    assert f.evidence["dead_fraction"]["l1"] >= 0.75 and f.step >= 90  # 10+ snapshots at q ~ 0.5


def test_an_unrouted_expert_or_unused_layer_is_not_dead():
    # Layer 2 (an expert no token was routed to) gets an exactly zero gradient on every step while the
    # layers below it keep learning: zero by design.
    rng = np.random.default_rng(11)
    run = Run(log_every=10).advance([1.0] * 300, zero_layers=(2,),
                                    snapshot=dead_snapshots(32, rng, 0.0, whole_zero=True, layer=2))
    assert "dead" not in run.kinds()


def test_a_dead_layer_that_cuts_the_flow_is_dead():
    # Layers 0 and 1 get exactly zero (everything flows through layer 1's dead ReLUs), the head learns.
    run = Run(log_every=10).advance([1.0] * 100, zero_layers=(0, 1))
    f = run.kinds()["dead"]
    assert f.layers == ("l0", "l1") and f.severity == "critical" and f.step == 9


def test_vanishing_behind_dead_units_reports_both_and_names_the_dead_layer():
    # 60% of layer 2's units are dead and the layers below it get 6 orders less gradient than the head.
    layers = make_layers(5)
    run = Run(layers=layers, log_every=10)
    rms_share = np.array([1e-12, 1e-10, 1e-3, 0.5, 0.5])
    rng = np.random.default_rng(12)
    run.advance([1.0] * 200, layer_share=rms_share / rms_share.sum(),
                snapshot=dead_snapshots(32, rng, 0.01, range(20), n_layers=5, layer=2))
    kinds = run.kinds()
    assert {"vanishing", "dead"} <= set(kinds)
    assert "l2" in kinds["vanishing"].cause and "dead units" in kinds["vanishing"].cause
    assert kinds["vanishing"].evidence["dead_layers_at_or_after_collapse"] == ["l2"]


# ------------------------------------------------------------------------------- vanishing / temporal

def temporal(orders_at):
    """Snapshots of one LSTM over 64 time steps whose first step gets 10**-orders_at(step) of the last."""
    def snap(step):
        per_t = np.logspace(-orders_at(step), 0, 64)
        return stats.Snapshot(temporal={"lstm": per_t})
    return snap


@pytest.mark.parametrize("log_every", [1, 5, 10, 50])
def test_through_time_vanishing_that_clears_as_the_net_learns_is_a_phase(log_every):
    # The held-out LSTM: 5 orders at steps 0-20, 0.48 at step 40, ~0.1 for the rest of the run.
    run = Run(log_every=log_every).advance([1.0] * 400, snapshot=temporal(lambda s: 5.0 if s <= 20 else 1.0))
    assert "vanishing" not in run.kinds()


@pytest.mark.parametrize("log_every", [1, 10, 50])
def test_persistent_through_time_vanishing_is_found_whatever_the_log_frequency(log_every):
    run = Run(log_every=log_every).advance([1.0] * 400, snapshot=temporal(lambda s: 9.0))
    f = run.kinds()["vanishing"]
    cfg = DetectorConfig()
    assert f.layers == ("lstm",) and f.severity == "critical"
    assert cfg.temporal_min_steps - 1 <= f.step <= cfg.temporal_min_steps + log_every
    assert f.evidence["held_for_steps"] >= cfg.temporal_min_steps


def test_depth_vanishing_step_is_where_it_was_established():
    run = Run(log_every=50)
    share = np.array([1e-18, 1e-12, 1e-6, 1.0])
    run.advance([1.0] * 300, layer_share=share / share.sum())
    f = run.kinds()["vanishing"]
    assert f.step == 49 and f.evidence["updated_at_step"] == 299


# ------------------------------------------------------------------------------- saturated

@pytest.mark.parametrize("log_every", [1, 50])
def test_saturation_needs_persistence_in_steps(log_every):
    sat = lambda frac_at: (lambda step: stats.Snapshot(saturation={"act": frac_at(step)}))
    brief = Run(log_every=log_every).advance([1.0] * 200, snapshot=sat(lambda s: 0.9 if 60 <= s < 65 else 0.1))
    assert "saturated" not in brief.kinds()
    held = Run(log_every=log_every).advance([1.0] * 200, snapshot=sat(lambda s: 0.9))
    f = held.kinds()["saturated"]
    assert f.layers == ("act",) and f.step == (9 if log_every == 1 else 49)


# ------------------------------------------------------------------------------- config, state

@pytest.mark.parametrize("field, value", [
    ("vanishing_ratio", 0.0), ("dead_chance", 1.5), ("dead_min_steps", 0), ("temporal_min_steps", 2.5),
    ("explosion_sustain_steps", True), ("update_ratio", 0.1), ("divergence_factor", 1.0), ("dead_fraction", 0.0),
])
def test_detector_config_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        DetectorConfig(**{field: value})


def test_detector_state_round_trips_through_json_mid_condition():
    import json
    rng = np.random.default_rng(13)
    snap = dead_snapshots(32, rng, 0.5, range(24))
    a = Run(log_every=10).advance([1.0] * 100, snapshot=snap)
    b = Run(log_every=10)
    b.monitor.load_state_dict(json.loads(json.dumps(a.monitor.state_dict())))
    b.state, b.step = a.state, a.step
    rng_a, rng_b = np.random.default_rng(14), np.random.default_rng(14)
    a.advance([1.0] * 500, snapshot=dead_snapshots(32, rng_a, 0.5, range(24)))
    b.advance([1.0] * 500, snapshot=dead_snapshots(32, rng_b, 0.5, range(24)))
    assert a.monitor.findings == b.monitor.findings and a.kinds()["dead"].step == b.kinds()["dead"].step


# ------------------------------------------------------------------------------- real torch runs

torch = pytest.importorskip("torch")
nn = torch.nn


def _digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 1e-3), torch.tensor(y)


def test_real_large_batch_tanh_mlp_with_a_transient_burst_is_not_exploding():
    from gradguard.torch import GradGuard
    torch.manual_seed(0)
    x, y = _digits()
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    guard = GradGuard(model, clip=None, log_every_n_steps=25)
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        idx = torch.randint(0, len(x), (512,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if step in (250, 251):  # a burst the optimizer does not feel: 68x the gradient for two steps
            loss = loss * 68.0
        opt.zero_grad()
        loss.backward()
        guard.step(opt)
    assert guard.engine.monitor.totals["spikes"] >= 1
    assert guard.findings == []
    guard.close()


def test_real_batch_size_one_net_is_neither_dead_nor_exploding():
    from gradguard.torch import GradGuard
    torch.manual_seed(1)
    x, y = _digits()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), 0.05)
    guard = GradGuard(model, clip=None, log_every_n_steps=10)
    for step in range(400):
        i = step % len(x)
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        opt.zero_grad()
        loss.backward()
        guard.step(opt)
    kinds = {f.kind for f in guard.findings}
    assert "dead" not in kinds and "exploding" not in kinds
    guard.close()


class _TinyLSTM(nn.Module):
    def __init__(self, vocab=12, hidden=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, t):
        out, _ = self.lstm(self.emb(t))
        return self.head(out[:, -1])


@pytest.mark.parametrize("log_every", [1, 10])
def test_real_lstm_that_learns_is_not_vanishing_through_time(log_every):
    from gradguard.torch import GradGuard
    torch.manual_seed(2)
    model = _TinyLSTM()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    guard = GradGuard(model, clip=None, log_every_n_steps=log_every)
    g = torch.Generator().manual_seed(2)
    losses = []
    for step in range(150):
        t = torch.randint(0, 12, (64, 12), generator=g)
        y = t[:, -3] % 4  # a token 3 steps back: learnable within the run
        loss = nn.functional.cross_entropy(model(t), y)
        opt.zero_grad()
        loss.backward()
        guard.step(opt)
        losses.append(float(loss))
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:10])  # it learns
    assert "vanishing" not in {f.kind for f in guard.findings}
    guard.close()
