"""Each attack's loss against a hand computation (numpy) on a tiny batch, and the log-prob recovery."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from audit.attacks import (ATTACKS, BATTERY, DKD, KD, MIMKD, VID, AttackContext, CalibratedKD, HardLabel, LogitMSE,
                           LogitStd, Skeptical, expand_attacks)
from audit.attacks.calibrated_kd import fit_temperature
from audit.attacks.mimkd import jsd_mi_loss
from audit.recover import is_one_hot, recover_logp
from protect.registry import UnknownNameError

torch.set_num_threads(1)
B, C = 4, 5


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_ce(z, y):
    return float(-np_log_softmax(z)[np.arange(len(y)), y].mean())


def np_kd(s, t_logp, T):
    pt, lpt, lps = np_softmax(t_logp / T), np_log_softmax(t_logp / T), np_log_softmax(s / T)
    return float((pt * (lpt - lps)).sum(1).mean() * T * T)


class FixedStudent(nn.Module):
    """A 'model' whose logits and features are parameters: the loss sees exactly these numbers."""

    def __init__(self, logits: np.ndarray, mid_channels: int = 3, pen: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.z = nn.Parameter(torch.tensor(logits, dtype=torch.float32))
        self.mid = nn.Parameter(torch.randn(len(logits), mid_channels, 4, 4, generator=g))
        self.pen = nn.Parameter(torch.randn(len(logits), pen, generator=g))
        self.feature_dims = {"mid": mid_channels, "penultimate": pen}

    def forward(self, x):
        return self.z

    def forward_features(self, x):
        return self.z, {"mid": self.mid, "penultimate": self.pen}


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    z_s = rng.normal(size=(B, C)) * 2
    z_t = rng.normal(size=(B, C)) * 3
    y = np.array([0, 2, 4, 1])
    batch = {"x": torch.zeros(B, 1, 2, 2), "y": torch.tensor(y), "index": torch.arange(B),
             "teacher_logp": torch.tensor(np_log_softmax(z_t), dtype=torch.float32)}
    return z_s, z_t, y, batch


def val(t):
    return float(t.detach())


def total(losses):
    return float(sum(v.detach() for v in losses.values()))


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.9), (32.0, 0.5)])
def test_kd_matches_hand_computation(tiny, T, alpha):
    z_s, z_t, y, batch = tiny
    logits, losses = KD(T, alpha).forward_train(FixedStudent(z_s), batch)
    expected = alpha * np_kd(z_s, np_log_softmax(z_t), T) + (1 - alpha) * np_ce(z_s, y)
    assert total(losses) == pytest.approx(expected, rel=1e-5)
    assert set(losses) == {"kd", "ce"}
    assert torch.equal(logits, torch.tensor(z_s, dtype=torch.float32))


def test_kd_on_log_probs_equals_kd_on_logits(tiny):
    """The recovered log-probs give the same KD loss as the teacher's logits themselves (docs/design.md §3)."""
    z_s, z_t, y, batch = tiny
    with_logits = dict(batch, teacher_logp=torch.tensor(z_t + 7.0, dtype=torch.float32))
    a = total(KD(4.0, 0.9).forward_train(FixedStudent(z_s), batch)[1])
    b = total(KD(4.0, 0.9).forward_train(FixedStudent(z_s), with_logits)[1])
    assert a == pytest.approx(b, rel=1e-5)


def test_hard_label_is_ce_on_teacher_argmax(tiny):
    z_s, z_t, y, batch = tiny
    _, losses = HardLabel().forward_train(FixedStudent(z_s), batch)
    assert total(losses) == pytest.approx(np_ce(z_s, z_t.argmax(1)), rel=1e-6)
    assert not HardLabel.needs_soft


def test_logit_mse(tiny):
    z_s, z_t, y, batch = tiny
    _, losses = LogitMSE().forward_train(FixedStudent(z_s), batch)
    centred = z_t - z_t.mean(1, keepdims=True)  # centred log-probs = centred logits
    assert val(losses["mse"]) == pytest.approx(((z_s - centred) ** 2).mean(), rel=1e-5)
    assert val(losses["ce"]) == pytest.approx(np_ce(z_s, y), rel=1e-6)


def test_logit_std(tiny):
    z_s, z_t, y, batch = tiny

    def zscore(z):
        return (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)

    _, losses = LogitStd().forward_train(FixedStudent(z_s), batch)
    assert val(losses["kd_std"]) == pytest.approx(9.0 * np_kd(zscore(z_s), zscore(z_t), 2.0), rel=1e-4)
    assert val(losses["ce"]) == pytest.approx(0.1 * np_ce(z_s, y), rel=1e-6)


def np_dkd(s, t, y, T):
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    tckd = nckd = 0.0
    for i, yi in enumerate(y):
        bs, bt = np.array([ps[i, yi], 1 - ps[i, yi]]), np.array([pt[i, yi], 1 - pt[i, yi]])
        tckd += (bt * np.log(bt / bs)).sum()
        keep = np.arange(s.shape[1]) != yi
        qs, qt = ps[i, keep] / ps[i, keep].sum(), pt[i, keep] / pt[i, keep].sum()
        nckd += (qt * np.log(qt / qs)).sum()
    return tckd / len(y) * T * T, nckd / len(y) * T * T


def test_dkd_parts_and_warmup(tiny):
    z_s, z_t, y, batch = tiny
    tckd, nckd = np_dkd(z_s, z_t, y, 4.0)
    obj = DKD(alpha=1.0, beta=8.0, temperature=4.0, warmup=0.5)
    obj.set_epoch(0, 4)  # warm-up over round(0.5·4) = 2 epochs: factor 1/2 in the first
    _, losses = obj.forward_train(FixedStudent(z_s), batch)
    assert val(losses["tckd"]) == pytest.approx(0.5 * tckd, rel=1e-4)
    assert val(losses["nckd"]) == pytest.approx(0.5 * 8.0 * nckd, rel=1e-4)
    assert val(losses["ce"]) == pytest.approx(np_ce(z_s, y), rel=1e-6)
    obj.set_epoch(1, 4)
    _, losses = obj.forward_train(FixedStudent(z_s), batch)
    assert val(losses["tckd"]) == pytest.approx(tckd, rel=1e-4)


def test_dkd_reference_satisfies_the_papers_identity(tiny):
    """KD = TCKD + (1 − p_t^target)·NCKD (Zhao et al., eq. 7): checks the hand computation used above."""
    z_s, z_t, y, batch = tiny
    tckd, nckd = np_dkd(z_s, z_t, y, 1.0)
    ps, pt = np_softmax(z_s), np_softmax(z_t)
    kd_rows = (pt * (np.log(pt) - np.log(ps))).sum(1)
    for i, yi in enumerate(y):  # per-row identity, checked on the numpy side used above
        t_i, n_i = np_dkd(z_s[i:i + 1], z_t[i:i + 1], y[i:i + 1], 1.0)
        assert kd_rows[i] == pytest.approx(t_i + (1 - pt[i, yi]) * n_i, rel=1e-6)


def test_skeptical_delay_and_losses(tiny):
    z_s, z_t, y, batch = tiny
    student = FixedStudent(z_s)
    obj = Skeptical(C, student.feature_dims, temperature=4.0, alpha=0.9, self_distill=1.0, delay=0.5)
    assert sum(p.numel() for p in obj.parameters()) > 0  # the auxiliary head is trained with the student
    obj.eval()  # BatchNorm in eval mode: the aux head is a fixed function for the hand check
    aux = obj.aux(student.mid).detach().double().numpy()
    obj.set_epoch(0, 4)  # delay: int(0.5·4) = 2 epochs with labels only
    _, losses = obj.forward_train(student, batch)
    assert val(losses["aux_kd"]) == 0.0
    assert val(losses["aux_ce"]) == pytest.approx(np_ce(aux, y), rel=1e-5)
    assert val(losses["ce"]) == pytest.approx(np_ce(z_s, y), rel=1e-6)
    assert val(losses["self_kd"]) == pytest.approx(np_kd(z_s, aux, 4.0), rel=1e-4)
    obj.set_epoch(2, 4)
    _, losses = obj.forward_train(student, batch)
    assert val(losses["aux_kd"]) == pytest.approx(0.9 * np_kd(aux, z_t, 4.0), rel=1e-4)
    assert val(losses["aux_ce"]) == pytest.approx(0.1 * np_ce(aux, y), rel=1e-5)
    # the final head gets no gradient from the teacher: d(aux_kd)/dz = 0
    losses["aux_kd"].backward()
    assert student.z.grad is None or float(student.z.grad.abs().sum()) == 0.0


def test_calibrated_kd_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4000, 6)) * 4
    true_tau = 2.5
    p = np_softmax(z / true_tau)
    labels = torch.tensor([rng.choice(6, p=row) for row in p])
    tau = fit_temperature(torch.tensor(np_log_softmax(z)), labels)
    assert tau == pytest.approx(true_tau, rel=0.1)


def test_calibrated_kd_loss(tiny):
    z_s, z_t, y, batch = tiny
    obj = CalibratedKD(2.0, temperature=3.0, alpha=0.8)
    _, losses = obj.forward_train(FixedStudent(z_s), batch)
    expected = 0.8 * np_kd(z_s, np_log_softmax(z_t) / 2.0, 3.0) + 0.2 * np_ce(z_s, y)
    assert total(losses) == pytest.approx(expected, rel=1e-5)


def test_calibrated_kd_builds_from_context():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(2000, 4)) * 3
    labels = torch.tensor([rng.choice(4, p=row) for row in np_softmax(z / 0.5)])
    ctx = AttackContext(num_classes=4, teacher_logp=torch.tensor(np_log_softmax(z), dtype=torch.float32), labels=labels)
    obj = ATTACKS.get("calibrated-kd").build(ctx)
    assert obj.tau == pytest.approx(0.5, rel=0.15)


def test_vid_gaussian_bound(tiny):
    z_s, z_t, y, batch = tiny
    student = FixedStudent(z_s)
    obj = VID(C, student.feature_dims, weight=1.0, hidden=8, init_variance=5.0)
    assert float(obj.variance()[0].detach()) == pytest.approx(5.0, rel=1e-5)
    with torch.no_grad():
        obj.raw_variance.copy_(torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0]))
    mu = obj.regressor(student.pen).detach().double().numpy()
    var = np.log1p(np.exp([-1.0, 0.0, 0.5, 1.0, 2.0])) + 1e-5
    t = z_t - z_t.mean(1, keepdims=True)
    expected = (0.5 * ((mu - t) ** 2 / var + np.log(var))).mean()
    _, losses = obj.forward_train(student, batch)
    assert val(losses["vid"]) == pytest.approx(expected, rel=1e-5)
    assert val(losses["ce"]) == pytest.approx(np_ce(z_s, y), rel=1e-6)
    losses["vid"].backward()
    assert obj.raw_variance.grad is not None and student.pen.grad is not None  # variance and student both learn


def test_jsd_bound_by_hand():
    s = torch.tensor([[2.0, -1.0], [0.5, 1.5]])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = (sp(-2.0) + sp(-1.5)) / 2 + (sp(-1.0) + sp(0.5)) / 2
    assert float(jsd_mi_loss(s)) == pytest.approx(expected, rel=1e-6)


def test_mimkd_uses_in_batch_negatives(tiny):
    z_s, z_t, y, batch = tiny
    student = FixedStudent(z_s)
    obj = MIMKD(C, student.feature_dims, embed=4, hidden=8)
    scores = obj.scores(student.pen, batch["teacher_logp"]).detach().double().numpy()
    assert scores.shape == (B, B)
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    off = ~np.eye(B, dtype=bool)
    expected = sp(-np.diag(scores)).mean() + sp(scores[off]).mean()
    _, losses = obj.forward_train(student, batch)
    assert val(losses["mi"]) == pytest.approx(expected, rel=1e-5)
    losses["mi"].backward()
    assert all(p.grad is not None for p in obj.parameters()) and student.pen.grad is not None


def test_registry_and_expansion():
    assert set(ATTACKS.names()) == set(BATTERY)
    names = [v.name for v in expand_attacks("all")]
    assert names[:12] == [f"kd-T{t}-a{a}" for t in (1, 2, 4, 8, 16, 32) for a in (0.5, 0.9)]
    assert set(names[12:]) == set(BATTERY) - {"kd"}
    assert [v.name for v in expand_attacks("kd", kd_grid="quick")] == ["kd-T2-a0.5", "kd-T2-a0.9", "kd-T4-a0.5",
                                                                       "kd-T4-a0.9"]
    assert [v.options for v in expand_attacks("kd-T3-a0.7")] == [{"temperature": 3.0, "alpha": 0.7}]
    with pytest.raises(UnknownNameError, match="valid names: .*calibrated-kd.*vid"):
        expand_attacks("kd,nope")


def test_log_prob_recovery_preserves_tempered_softmax():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(64, 10)) * 3
    p = np_softmax(z).astype(np.float32)
    rec = recover_logp(p, floor=1e-12)
    assert rec.clamped_entries == 0 and not rec.label_only
    for T in (1.0, 2.0, 4.0, 16.0):
        got = torch.softmax(rec.logp.double() / T, 1).numpy()
        assert np.abs(got - np_softmax(z / T)).max() < 1e-5


def test_recovery_clamps_and_counts_topk_and_detects_labels():
    p = np.array([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.9, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=np.float32)
    rec = recover_logp(p, floor=1e-4)
    assert rec.clamped_entries == 4 and rec.clamped_rows == 2
    assert np.allclose(torch.exp(rec.logp).sum(1).numpy(), 1.0, atol=1e-6)
    # unclamped entries keep their ratios: log p0 − log p1 unchanged
    assert float(rec.logp[0, 0] - rec.logp[0, 1]) == pytest.approx(math.log(0.7 / 0.3), rel=1e-5)
    one_hot = np.eye(4, dtype=np.float32)[[2, 0, 1]]
    assert is_one_hot(one_hot) and recover_logp(one_hot).label_only
    assert not is_one_hot(p)
