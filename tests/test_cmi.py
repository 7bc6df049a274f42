"""The CMI math against brute force, its limits (docs/design.md §2), and the direction of CMIM/MCMI gradients."""
import numpy as np
import pytest
import torch

from protect import CMIMLoss, MCMILoss, conditional_mutual_information
from protect.cmi import CentroidBank, aggregate, log_spaced_temperatures, separation


def brute_force_cmi(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    z = logits / t
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    total = 0.0
    for i in range(len(labels)):
        q = p[labels == labels[i]].mean(0)
        total += sum(p[i, c] * np.log(p[i, c] / q[c]) for c in range(p.shape[1]))
    return total / len(labels)


@pytest.mark.parametrize("t", [0.5, 1.0, 4.0, 16.0])
def test_cmi_matches_brute_force(t):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 5)) * 3
    labels = rng.integers(0, 5, size=60)
    ours = conditional_mutual_information(torch.tensor(logits), torch.tensor(labels), t, 5)
    assert float(ours) == pytest.approx(brute_force_cmi(logits, labels, t), rel=1e-6, abs=1e-9)


def test_cmi_zero_when_outputs_equal_within_class_up_to_a_constant():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 6)) * 5
    labels = rng.integers(0, 4, size=80)
    shift = rng.normal(size=(80, 1)) * 10  # an additive constant per row leaves softmax unchanged
    logits = torch.tensor(base[labels] + shift)
    for t in (0.3, 1, 7, 50):
        assert float(conditional_mutual_information(logits, torch.tensor(labels), t, 4)) < 1e-10
    # ...and not zero once one row moves off its class's point
    logits[0, 0] += 3.0
    assert float(conditional_mutual_information(logits, torch.tensor(labels), 1.0, 4)) > 1e-4


def test_cmi_vanishes_as_temperature_grows_like_one_over_t_squared():
    rng = np.random.default_rng(2)
    logits = torch.tensor(rng.normal(size=(200, 10)) * 4)
    labels = torch.tensor(rng.integers(0, 10, size=200))
    values = [float(conditional_mutual_information(logits, labels, t, 10)) for t in (8, 16, 32, 64, 128)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] < 1e-3 * values[0] * 10
    ratios = [a / b for a, b in zip(values[1:], values[2:])]
    assert ratios[-1] == pytest.approx(4.0, rel=0.05)  # doubling T divides CMI by ~4 for large T


def test_any_other_centroid_gives_a_larger_expected_kl():
    rng = np.random.default_rng(3)
    logits = torch.tensor(rng.normal(size=(100, 5)) * 2)
    labels = torch.tensor(rng.integers(0, 5, size=100))
    exact = float(conditional_mutual_information(logits, labels, 2.0, 5))
    for _ in range(20):
        q = torch.softmax(torch.tensor(rng.normal(size=(5, 5))), 1)
        assert float(conditional_mutual_information(logits, labels, 2.0, 5, centroids=q)) >= exact - 1e-12


def test_separation_positive_and_ncmi_finite():
    rng = np.random.default_rng(4)
    labels = torch.tensor(rng.integers(0, 3, size=90))
    logits = torch.nn.functional.one_hot(labels, 3).double() * 6 + torch.tensor(rng.normal(size=(90, 3)))
    assert separation(logits, labels, 1.0, 3) > 1.0


def _fixed_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(64, 10, generator=g) * 2, torch.randint(0, 10, (64,), generator=g)


@pytest.mark.parametrize("loss_cls,direction", [(CMIMLoss, -1), (MCMILoss, +1)])
def test_one_step_moves_cmi_the_right_way(loss_cls, direction):
    logits0, labels = _fixed_batch()
    loss_fn = loss_cls(10, lam=1.0) if loss_cls is MCMILoss else loss_cls(10, lam=1.0, temperatures=(1.0,))
    loss_fn.bank.exact_pass(torch.nn.Identity(), [{"x": logits0, "y": labels}], torch.device("cpu"))
    loss_fn.eval()  # centroids fixed for this check: the θ-step alone
    logits = logits0.clone().requires_grad_(True)
    parts = loss_fn.parts(logits, labels)
    parts["cmi"].backward()
    stepped = logits0 - 0.5 * logits.grad
    before = float(conditional_mutual_information(logits0, labels, 1.0, 10))
    after = float(conditional_mutual_information(stepped, labels, 1.0, 10))
    assert (after - before) * direction > 0


def test_ema_centroids_approach_class_means():
    bank = CentroidBank(3, [1.0, 4.0], momentum=0.5)
    logits = torch.tensor([[3.0, 0, 0], [2.0, 0, 0], [0, 4.0, 0]])
    labels = torch.tensor([0, 0, 1])
    for _ in range(30):
        bank.update(logits, labels)
    expected = torch.softmax(logits[:2], 1).mean(0)
    assert torch.allclose(bank.centroids[0, 0], expected, atol=1e-6)
    assert bool(bank.initialised[0, 2]) is False  # class 2 never seen: left uniform
    assert torch.allclose(bank.centroids[0, 2], torch.full((3,), 1 / 3))


def test_aggregators_and_weighting():
    terms = torch.tensor([0.4, 0.1, 0.02])
    temps = [1.0, 4.0, 16.0]
    assert float(aggregate(terms, temps, "mean", "1")) == pytest.approx(float(terms.mean()))
    assert float(aggregate(terms, temps, "max", "T2")) == pytest.approx(0.02 * 256)
    soft = float(aggregate(terms, temps, "softmax", "1"))
    assert float(terms.mean()) < soft <= 0.4
    with pytest.raises(ValueError, match="aggregator"):
        aggregate(terms, temps, "median", "1")
    assert log_spaced_temperatures(1, 32, 6) == [1, 2, 4, 8, 16, 32]


def test_calibrated_term_follows_the_logits_scale_so_a_shrink_cannot_lower_it():
    logits, labels = _fixed_batch()
    logits = logits + 6 * torch.nn.functional.one_hot(labels, 10)  # mostly right, so τ is well defined

    def term(calibrated: bool, z: torch.Tensor) -> tuple[float, float]:
        loss_fn = CMIMLoss(10, lam=1.0, temperatures=(1.0, 4.0), calibrated=calibrated)
        loss_fn.parts(z, labels)  # training mode: centroids (and τ) from this batch
        loss_fn.eval()
        tau = float(torch.exp(loss_fn.log_tau)) if calibrated else 1.0
        return float(loss_fn.parts(z, labels)["cmi"]), tau

    # a plain CMIM term falls when the logits shrink (under-confident answers, undone by calibrated-kd) ...
    assert term(False, logits / 5)[0] < 0.5 * term(False, logits)[0]
    # ... the calibrated one does not move: τ shrinks with the logits
    (full, tau_full), (shrunk, tau_shrunk) = term(True, logits), term(True, logits / 5)
    assert shrunk == pytest.approx(full, rel=0.03)
    assert tau_shrunk == pytest.approx(tau_full / 5, rel=0.03)
    # τ is the NLL-optimal temperature (what the attacker's calibrated-kd fits)
    from protect.metrics import fit_temperature
    assert tau_full == pytest.approx(fit_temperature(torch.log_softmax(logits, 1), labels, lo=0.02, hi=50), rel=0.03)


def test_calibrated_cmim_rejects_exact_centroids():
    from protect.objectives.cmi_objectives import cmim
    with pytest.raises(ValueError, match="calibrated"):
        cmim(10, calibrated=True, exact_pass=True)
