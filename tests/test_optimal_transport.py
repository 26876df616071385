"""Tests of the POTSA Sinkhorn loss against geomloss (the paper's loss) and POT (a converged reference).

Conventions: "max relative" gradient error = max |grad - ref| / max |ref| over the tensor; "norm error" =
|grad - ref| / |ref|. Masked pairs are built with padding copied from a valid token, so that geomloss'
bounding box (taken over all points, padding included) is the one of the valid tokens, as in our loss.
"""

import math

import ot
import pytest
import torch
import torch.nn.functional as F
from geomloss import SamplesLoss
from geomloss._legacy.sinkhorn_divergence import epsilon_schedule as geomloss_epsilon_schedule

from modeling_potsa.optimal_transport import epsilon_schedule, sinkhorn_divergence

MODES = ["geomloss", "converged"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _max_relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max()).item()


def _norm_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def _masked_pairs(dtype=torch.float32, d: int = 32, seed: int = 0):
    """Three pairs of unequal lengths (12 and 9 tokens), padded; padding repeats the first token."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 12, d, generator=generator, dtype=dtype)
    y = torch.randn(3, 9, d, generator=generator, dtype=dtype)
    x_mask = torch.arange(12) < torch.tensor([[12], [7], [10]])
    y_mask = torch.arange(9) < torch.tensor([[5], [9], [8]])
    x = torch.where(x_mask[..., None], x, x[:, :1])
    y = torch.where(y_mask[..., None], y, y[:, :1])
    return x, y, x_mask, y_mask


def _value_and_grads(x, y, *args, **kwargs):
    """Our loss summed over pairs, with the gradients with respect to the raw x and y."""
    x, y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    values = sinkhorn_divergence(x, y, *args, **kwargs)
    values.sum().backward()
    return values.detach(), x.grad, y.grad


def _geomloss_per_pair(x, y, x_mask, y_mask, blur=0.05, debias=True):
    """What the POTSA code runs: SamplesLoss per pair, on normalised tokens, zero weight on padding."""
    x, y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, debias=debias, backend="tensorized")
    x_unit, y_unit = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    values = []
    for b in range(x.shape[0]):
        alpha, beta = x_mask[b].to(x.dtype), y_mask[b].to(y.dtype)
        values.append(loss(alpha / alpha.sum(), x_unit[b], beta / beta.sum(), y_unit[b]))
    values = torch.stack(values)
    values.sum().backward()
    return values.detach(), x.grad, y.grad


def _pot_reference(x, y, x_mask, y_mask, blur=0.05):
    """Converged float64 reference from POT for S = OT(x,y) - OT(x,x)/2 - OT(y,y)/2 and each OT term.

    ``ot.solve(reg_type="kl")`` returns the primal <P, C> + eps KL(P | a b^T), which at the optimum equals
    the dual value <a, f> + <b, g> that geomloss and our loss report (checked in
    ``test_pot_kl_value_is_the_dual_value``); ``grad="envelope"`` gives the gradient dvalue/dC = P.
    """
    x = x.detach().to(torch.float64).requires_grad_()
    y = y.detach().to(torch.float64).requires_grad_()
    x_unit, y_unit = F.normalize(x, dim=-1), F.normalize(y, dim=-1)

    def entropic_ot(u, v):
        cost = torch.cdist(u, v) ** 2 / 2
        return ot.solve(cost, reg=blur**2, reg_type="kl", tol=1e-10, max_iter=100_000, grad="envelope").value

    terms = []
    for b in range(x.shape[0]):
        u, v = x_unit[b][x_mask[b]], y_unit[b][y_mask[b]]
        terms.append(torch.stack([entropic_ot(u, v), entropic_ot(u, u), entropic_ot(v, v)]))
    terms = torch.stack(terms)  # (B, 3)
    values = terms[:, 0] - terms[:, 1] / 2 - terms[:, 2] / 2
    values.sum().backward()
    return values.detach(), x.grad, y.grad, terms.detach()


def test_epsilon_schedule_is_geomloss():
    for diameter in (7.3, 2.0, 0.9, 0.051):
        assert epsilon_schedule(diameter, 0.05, 0.5) == pytest.approx(
            geomloss_epsilon_schedule(2, diameter, 0.05, 0.5), rel=1e-12
        )
    assert epsilon_schedule(0.0, 0.05, 0.5) == pytest.approx([0.05**2] * 2)  # geomloss fails on 0


@pytest.mark.parametrize("debias", [True, False])
def test_geomloss_mode_matches_geomloss_per_pair_with_masks(debias):
    x, y, x_mask, y_mask = _masked_pairs()
    value, grad_x, grad_y = _value_and_grads(x, y, x_mask, y_mask, debias=debias)
    ref_value, ref_grad_x, ref_grad_y = _geomloss_per_pair(x, y, x_mask, y_mask, debias=debias)
    assert ((value - ref_value).abs() / ref_value.abs()).max() < 1e-4
    assert _max_relative(grad_x, ref_grad_x) < 1e-3
    assert _max_relative(grad_y, ref_grad_y) < 1e-3


def test_geomloss_mode_matches_geomloss_at_paper_scale():
    """80 query tokens per utterance, d = 768, as in POTSA; no masks."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 2, 80, 768, generator=generator)
    mask = torch.ones(2, 80, dtype=torch.bool)
    value, grad_x, grad_y = _value_and_grads(x, y)
    ref_value, ref_grad_x, ref_grad_y = _geomloss_per_pair(x, y, mask, mask)
    assert ((value - ref_value).abs() / ref_value).max() < 1e-4
    assert _max_relative(grad_x, ref_grad_x) < 1e-3
    assert _max_relative(grad_y, ref_grad_y) < 1e-3


def test_each_pair_is_independent_of_the_batch():
    """Per-pair diameters: a pair's value and gradient do not depend on the other pairs."""
    x, y, x_mask, y_mask = _masked_pairs()
    x[2] *= 5  # a far-away pair would widen a batch-wide bounding box (with normalize=False)
    alone = _value_and_grads(x[:1], y[:1], x_mask[:1], y_mask[:1], normalize=False)
    batched = _value_and_grads(x, y, x_mask, y_mask, normalize=False)
    for single, in_batch in zip(alone, batched):
        torch.testing.assert_close(single, in_batch[:1])


@pytest.mark.parametrize("mode", MODES)
def test_padding_has_no_mass(mode):
    x, y, x_mask, y_mask = _masked_pairs()
    value, grad_x, grad_y = _value_and_grads(x, y, x_mask, y_mask, mode=mode)
    noisy_x = torch.where(x_mask[..., None], x, 100 * torch.randn_like(x))
    noisy_y = torch.where(y_mask[..., None], y, 100 * torch.randn_like(y))
    noisy_value, noisy_grad_x, noisy_grad_y = _value_and_grads(noisy_x, noisy_y, x_mask, y_mask, mode=mode)
    torch.testing.assert_close(noisy_value, value)
    torch.testing.assert_close(noisy_grad_x, grad_x)
    torch.testing.assert_close(noisy_grad_y, grad_y)
    assert noisy_grad_x[~x_mask].abs().max() == 0 and noisy_grad_y[~y_mask].abs().max() == 0


def test_converged_mode_matches_pot_reference():
    x, y, x_mask, y_mask = _masked_pairs()
    value, grad_x, grad_y = _value_and_grads(x, y, x_mask, y_mask, mode="converged")
    ref_value, ref_grad_x, ref_grad_y, ref_terms = _pot_reference(x, y, x_mask, y_mask)
    assert ((value.double() - ref_value).abs() / ref_value.abs()).max() < 1e-4
    assert _norm_error(grad_x.double(), ref_grad_x) < 0.02
    assert _norm_error(grad_y.double(), ref_grad_y) < 0.02
    # the plain entropic value OT(x, y) is the first POT term
    plain = sinkhorn_divergence(x, y, x_mask, y_mask, debias=False, mode="converged")
    assert ((plain.double() - ref_terms[:, 0]).abs() / ref_terms[:, 0]).max() < 1e-4
    # geomloss' schedule does not converge: this is why the converged mode exists
    truncated = _value_and_grads(x, y, x_mask, y_mask)
    assert _norm_error(truncated[1].double(), ref_grad_x) > 0.05


def test_converged_mode_matches_pot_on_each_term():
    """With x = y the divergence is 0, so check OT(x, x) itself: the debiasing terms converge too."""
    x, _, x_mask, _ = _masked_pairs()
    *_, ref_terms = _pot_reference(x, x, x_mask, x_mask)
    plain = sinkhorn_divergence(x, x, x_mask, x_mask, debias=False, mode="converged")
    assert ((plain.double() - ref_terms[:, 1]).abs() / ref_terms[:, 1]).max() < 1e-4


def test_pot_kl_value_is_the_dual_value():
    """POT's KL-regularised primal value equals the dual <a, f> + <b, g> that geomloss reports."""
    generator = torch.Generator().manual_seed(2)
    u = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    v = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    eps = 0.05
    cost = torch.cdist(u, v) ** 2 / 2
    a, b = torch.full((7,), 1 / 7, dtype=torch.float64), torch.full((6,), 1 / 6, dtype=torch.float64)
    result = ot.solve(cost, a, b, reg=eps, reg_type="kl", tol=1e-12, max_iter=100_000)
    log_u, log_v = result.potentials  # plan = exp(log_u_i + log_v_j - C_ij / eps) = a_i b_j e^{(f_i+g_j-C_ij)/eps}
    f, g = eps * (log_u - a.log()), eps * (log_v - b.log())
    assert result.value.item() == pytest.approx((a @ f + b @ g).item(), rel=1e-9)
    plain = sinkhorn_divergence(u[None], v[None], blur=math.sqrt(eps), debias=False, normalize=False, mode="converged")
    assert plain.item() == pytest.approx(result.value.item(), rel=1e-6)


def test_geomloss_mode_gradient_matches_finite_differences():
    """The envelope gradient is exact where geomloss' schedule converges: here, a kernel nearly flat at
    this blur (on generic inputs its truncated loop gives geomloss' gradient, not the exact one)."""
    generator = torch.Generator().manual_seed(3)
    center = torch.randn(2, 1, 8, generator=generator, dtype=torch.float64)
    x = center + 0.1 * torch.randn(2, 6, 8, generator=generator, dtype=torch.float64)
    y = center + 0.1 * torch.randn(2, 5, 8, generator=generator, dtype=torch.float64)
    x_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    inputs = (x.requires_grad_(), y.requires_grad_())
    assert torch.autograd.gradcheck(lambda u, v: sinkhorn_divergence(u, v, x_mask, blur=0.5), inputs)


def test_converged_mode_gradient_matches_finite_differences():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    x_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])

    def loss(u, v):
        return sinkhorn_divergence(u, v, x_mask, mode="converged", tol=1e-10)

    assert torch.autograd.gradcheck(loss, (x, y))


@pytest.mark.parametrize("mode", MODES)
def test_divergence_of_a_set_with_itself_is_zero_and_positive_otherwise(mode):
    x, y, x_mask, y_mask = _masked_pairs()
    assert sinkhorn_divergence(x, x, x_mask, x_mask, mode=mode).abs().max() < 1e-6
    assert sinkhorn_divergence(x, y, x_mask, y_mask, mode=mode).min() > 0
    close = x + 0.05 * torch.randn_like(x)  # small but positive divergences
    assert sinkhorn_divergence(x, close, x_mask, x_mask, mode=mode).min() > -1e-6


@pytest.mark.parametrize("mode", MODES)
def test_permutation_invariance(mode):
    x, y, x_mask, y_mask = _masked_pairs()
    value, grad_x, grad_y = _value_and_grads(x, y, x_mask, y_mask, mode=mode)
    px, py = torch.randperm(x.shape[1]), torch.randperm(y.shape[1])
    permuted = _value_and_grads(x[:, px], y[:, py], x_mask[:, px], y_mask[:, py], mode=mode)
    torch.testing.assert_close(permuted[0], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted[1], grad_x[:, px], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(permuted[2], grad_y[:, py], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_small_blur_in_float32_is_finite(mode):
    x, y, x_mask, y_mask = _masked_pairs(d=768)
    value, grad_x, grad_y = _value_and_grads(x, y, x_mask, y_mask, blur=0.01, mode=mode)
    assert torch.isfinite(value).all() and torch.isfinite(grad_x).all() and torch.isfinite(grad_y).all()
    assert value.min() > 0


@pytest.mark.parametrize("mode", MODES)
def test_autograd_graph_only_when_needed(mode):
    x, y, x_mask, y_mask = _masked_pairs()
    x.requires_grad_()
    with torch.no_grad():
        value = sinkhorn_divergence(x, y, x_mask, y_mask, mode=mode)
    assert value.grad_fn is None and not value.requires_grad
    value = sinkhorn_divergence(x, y, x_mask, y_mask, mode=mode)
    assert value.grad_fn is not None and value.requires_grad
    assert sinkhorn_divergence(x.detach(), y, x_mask, y_mask, mode=mode).grad_fn is None


def test_no_silent_second_derivatives():
    """The envelope gradient has no meaningful derivative: differentiating it twice must fail loudly."""
    x, y, *_ = _masked_pairs()
    x.requires_grad_()
    weight = torch.tensor(2.0, requires_grad=True)  # makes the incoming gradient require grad
    (grad,) = torch.autograd.grad((weight * sinkhorn_divergence(x, y)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_float32(dtype):
    x, y, x_mask, y_mask = _masked_pairs(dtype=dtype)
    value, grad_x, grad_y = _value_and_grads(x, y, x_mask, y_mask)
    reference = _value_and_grads(x.float(), y.float(), x_mask, y_mask)
    assert value.dtype == torch.float32 and grad_x.dtype == dtype and grad_y.dtype == dtype
    torch.testing.assert_close(value, reference[0])
    torch.testing.assert_close(grad_x, reference[1].to(dtype))


def test_autocast_does_not_lower_precision():
    x, y, x_mask, y_mask = _masked_pairs()
    value = sinkhorn_divergence(x, y, x_mask, y_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_value, grad_x, _ = _value_and_grads(x, y, x_mask, y_mask)
    assert autocast_value.dtype == torch.float32 and grad_x.dtype == torch.float32
    torch.testing.assert_close(autocast_value, value, rtol=1e-6, atol=1e-7)


def test_single_tokens_give_the_cost_itself():
    """One token each: the plan is the single entry, so S = OT = C(x, y) exactly, for both costs."""
    x, y = torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[1.0, 0.0]]])  # cos = 0.6, |x-y|^2 / 2 = 10
    assert sinkhorn_divergence(x, y, normalize=False).item() == pytest.approx(10.0, rel=1e-5)
    assert sinkhorn_divergence(x, y, normalize=False, cost="cosine").item() == pytest.approx(0.4, rel=1e-5)
    assert sinkhorn_divergence(x, y).item() == pytest.approx(0.4, rel=1e-5)  # 1/2 |x/|x| - y/|y||^2


def test_cosine_cost_equals_squared_distance_of_normalised_tokens():
    x, y, x_mask, y_mask = _masked_pairs()
    cosine = _value_and_grads(x, y, x_mask, y_mask, normalize=False, cost="cosine")
    normalised = _value_and_grads(x, y, x_mask, y_mask)
    for a, b in zip(cosine, normalised):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_device_agnostic(device):
    x, y, x_mask, y_mask = _masked_pairs()
    on_device = _value_and_grads(x.to(device), y.to(device), x_mask.to(device), y_mask.to(device))
    on_cpu = _value_and_grads(x, y, x_mask, y_mask)
    assert on_device[0].device.type == device
    for a, b in zip(on_device, on_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


def test_warns_when_max_iter_is_too_small():
    x, y, x_mask, y_mask = _masked_pairs(d=768)
    with pytest.warns(UserWarning, match="max_iter=2"):
        sinkhorn_divergence(x, y, x_mask, y_mask, mode="converged", max_iter=2)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.randn(12, 32)), "shape \\(batch, tokens, features\\)"),
        (dict(y=torch.randn(2, 9, 32)), "same number of pairs"),
        (dict(y=torch.randn(3, 9, 16)), "same feature size"),
        (dict(x=torch.zeros(3, 12, 32, dtype=torch.long)), "floating point"),
        (dict(x_mask=torch.ones(3, 11, dtype=torch.bool)), "x_mask must be a bool tensor of shape \\(3, 12\\)"),
        (dict(y_mask=torch.ones(3, 9)), "mask.bool\\(\\)"),
        (dict(y_mask=torch.arange(9) < torch.tensor([[1], [0], [2]])), "y has no valid token in pairs \\[1\\]"),
        (dict(x=torch.randn(3, 0, 32), x_mask=None), "x has no valid token"),
        (dict(blur=0.0), "blur must be positive"),
        (dict(mode="exact"), "mode must be"),
        (dict(cost="euclidean"), "cost must be"),
        (dict(scaling=1.0), "scaling must lie in"),
        (dict(omega=2.0), "omega"),
        (dict(max_iter=0), "max_iter >= 1"),
    ],
)
def test_invalid_arguments_raise(change, message):
    x, y, x_mask, y_mask = _masked_pairs()
    arguments = dict(x=x, y=y, x_mask=x_mask, y_mask=y_mask) | change
    with pytest.raises(ValueError, match=message):
        sinkhorn_divergence(**arguments)
