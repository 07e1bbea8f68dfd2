import math

import pytest
import torch

from modeling_calm import CalmEnergyHead, CalmFlowHead, energy_score
from modeling_calm.modeling_calm_heads import CalmDiffusionHead, energy_score_ref, zero_init_layers
from tests.utils import tiny_calm_config


@pytest.mark.parametrize("beta", [1.0, 1.5, 0.8])
def test_energy_score_matches_double_loop_reference(beta):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, 6, generator=g)
    mean, log_std = torch.randn(7, 6, generator=g), 0.3 * torch.randn(7, 6, generator=g)
    eps = torch.randn(11, 7, 6, generator=g)
    fast, fidelity, diversity = energy_score(x, mean, log_std, beta=beta, target_noise=eps)
    slow = energy_score_ref(x, mean, log_std, beta=beta, target_noise=eps)
    torch.testing.assert_close(fast.double(), slow, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fast, diversity - 2 * fidelity)


def test_energy_score_is_minimised_by_the_true_distribution():
    # Proper scoring rule: samples from the target score higher (in expectation) than a shifted or collapsed set.
    g = torch.Generator().manual_seed(0)
    mean, log_std = torch.zeros(2000, 4), torch.zeros(2000, 4)
    true = torch.randn(8, 2000, 4, generator=g)
    shifted = true + 0.5
    collapsed = torch.zeros(8, 2000, 4) + 1e-3 * torch.randn(8, 2000, 4, generator=g)
    score = lambda s: energy_score(s, mean, log_std, generator=torch.Generator().manual_seed(5))[0].mean()
    assert score(true) > score(shifted) + 0.05
    assert score(true) > score(collapsed) + 0.05


def test_energy_score_gradient_finite_for_identical_samples():
    x = torch.zeros(4, 3, 5, requires_grad=True)
    score, _, _ = energy_score(x, torch.ones(3, 5), torch.zeros(3, 5))
    score.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_energy_head_sample_shapes_and_noise_dependence():
    head = CalmEnergyHead(tiny_calm_config())
    torch.nn.init.normal_(head.output.fc2.weight)  # zero-initialised: make samples depend on noise
    h = torch.randn(3, 5, 32)
    out = head.sample(h)
    assert out.shape == (3, 5, 8)
    noise = head.draw_noise((3, 5), device="cpu")
    torch.testing.assert_close(head.sample(h, noise=noise), head.sample(h, noise=noise))
    assert not torch.allclose(head.sample(h, noise=noise), head.sample(h, noise=noise + 0.1))
    with pytest.raises(ValueError, match="noise"):
        head.sample(h, noise=torch.zeros(3, 5, 7))


def test_energy_head_loss_conditions_once_per_position_like_sampling_each_copy():
    # The loss runs the conditioning path on h [N, D] once and broadcasts it over the S samples; that must equal
    # sampling every expanded copy of h on its own.
    head = CalmEnergyHead(tiny_calm_config())
    torch.nn.init.normal_(head.output.fc2.weight)
    g = torch.Generator().manual_seed(2)
    h, noise = torch.randn(6, 32, generator=g), head.draw_noise((4, 6), device="cpu", generator=g)
    mean, log_std, eps = torch.randn(6, 8, generator=g), torch.zeros(6, 8), torch.randn(16, 6, 8, generator=g)
    out = head.loss(h, mean, log_std, noise=noise, target_noise=eps)
    torch.testing.assert_close(out.samples, head.sample(h.expand(4, -1, -1), noise=noise), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        head.loss(h, mean, log_std, noise=noise[:, :5])


def test_energy_head_output_layer_starts_at_zero():
    from modeling_calm import CalmForCausalLM

    model = CalmForCausalLM(tiny_calm_config())
    assert torch.count_nonzero(model.head.output.fc2.weight) == 0


def test_flow_head_learns_a_known_gaussian():
    # Known answer: with a constant condition and target N(mu, sigma^2 I), the trained flow's samples must have
    # mean mu and std sigma (rectified flow between two Gaussians is learnable exactly by an MLP).
    torch.manual_seed(0)
    head = CalmFlowHead(tiny_calm_config(head_type="flow", flow_num_steps=16))
    for layer in zero_init_layers(head):
        torch.nn.init.zeros_(layer.weight)
    mu = torch.tensor([2.0, -1.0, 0.5, 0.0, 1.0, -2.0, 0.3, 1.5])
    sigma = 0.5
    h = torch.randn(1, 32).expand(256, 32)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 800)
    for _ in range(800):
        loss = head.loss(h, mu.expand(256, 8), torch.full((256, 8), torch.log(torch.tensor(sigma)))).loss.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        samples = head.sample(h[:1].expand(4000, 32), generator=torch.Generator().manual_seed(3))
    # Tolerances: 4000 samples give standard errors of 0.008 (mean) and 0.006 (std); the rest is the error of the
    # learned velocity and of 16 Euler steps (measured 0.016 and 0.065 with this seed).
    torch.testing.assert_close(samples.mean(0), mu, atol=0.05, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.full((8,), sigma), atol=0.1, rtol=0)


def test_flow_head_rejects_bad_step_count():
    head = CalmFlowHead(tiny_calm_config(head_type="flow"))
    with pytest.raises(ValueError, match="num_steps"):
        head.sample(torch.randn(2, 32), num_steps=0)


MU = torch.tensor([2.0, -1.0, 0.5, 0.0, 1.0, -2.0, 0.3, 1.5])


def _optimal_noise_prediction(head, variance):
    """E[eps | x_t] for a N(MU, variance I) target: the best noise predictor there is, in closed form."""

    def predict(x, t, hidden_states):
        a = head.alpha_bar[(t * 1000).round().long()][..., None]
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * variance + 1 - a)

    return predict


def test_diffusion_sampler_with_the_exact_noise_predictor_draws_the_target():
    # DDIM with the exact predictor is the probability-flow ODE: its samples must have the target's moments.
    head = CalmDiffusionHead(tiny_calm_config(head_type="diffusion", diffusion_num_steps=50))
    head.velocity = _optimal_noise_prediction(head, 0.25)
    samples = head.sample(torch.zeros(4000, 32), generator=torch.Generator().manual_seed(3))
    # Standard errors 0.008 (mean) and 0.006 (std); 50 DDIM steps add a bias measured at 0.025 on the std.
    torch.testing.assert_close(samples.mean(0), MU, atol=0.04, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.full((8,), 0.5), atol=0.05, rtol=0)


def test_diffusion_head_training_approaches_the_optimal_noise_prediction_loss():
    torch.manual_seed(0)
    head = CalmDiffusionHead(tiny_calm_config(head_type="diffusion"))
    for layer in zero_init_layers(head):  # as CalmPreTrainedModel._init_weights leaves them
        torch.nn.init.zeros_(layer.weight)
    h = torch.randn(1, 32).expand(256, 32)
    log_std = torch.full((256, 8), math.log(0.5))
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)

    def batch_loss(generator=None):
        return head.loss(h, MU.expand(256, 8), log_std, generator=generator).loss.mean()

    with torch.no_grad():
        first = sum(batch_loss(torch.Generator().manual_seed(i)).item() for i in range(20)) / 20
    for _ in range(600):
        loss = batch_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned = sum(batch_loss(torch.Generator().manual_seed(i)).item() for i in range(20)) / 20
        head_opt = CalmDiffusionHead(tiny_calm_config(head_type="diffusion"))
        head_opt.velocity = _optimal_noise_prediction(head_opt, 0.25)
        best = sum(
            head_opt.loss(h, MU.expand(256, 8), log_std, generator=torch.Generator().manual_seed(i)).loss.mean().item()
            for i in range(20)
        ) / 20
    # Untrained (eps = 0) the loss is E||eps||^2 = Z = 8: over 20 x 256 draws of a chi-square with 8 degrees of
    # freedom its standard error is 0.056 (tolerance 0.25, 4.5 sigma). 600 steps must close all but 20 % of the gap
    # above the optimum (estimated on the same 20 batches, so the comparison is paired).
    assert abs(first - 8.0) < 0.25
    assert best < learned < best + 0.2 * (first - best), (first, learned, best)


def test_diffusion_head_sample_is_a_function_of_its_noise_and_checks_its_steps():
    torch.manual_seed(0)
    head = CalmDiffusionHead(tiny_calm_config(head_type="diffusion", diffusion_num_steps=4))
    for layer in zero_init_layers(head):
        torch.nn.init.normal_(layer.weight, std=0.02)
    h = torch.randn(3, 32)
    noise = head.draw_noise((3,), generator=torch.Generator().manual_seed(1))
    assert noise.shape == (3, head.noise_size) == (3, 8)
    a, b = head.sample(h, noise=noise), head.sample(h, noise=noise)
    assert torch.equal(a, b) and a.shape == (3, 8)
    assert not torch.equal(a, head.sample(h, noise=noise + 1))
    assert not torch.equal(a, head.sample(h, noise=noise, num_steps=1))
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            head.sample(h, num_steps=bad)
    with pytest.raises(ValueError, match="diffusion_num_steps"):
        tiny_calm_config(head_type="diffusion", diffusion_num_steps=1001)
    # A zero-initialised head predicts eps = 0, so one DDIM step from level 999 returns x0 = x_T / sqrt(alpha_bar(999)):
    # a closed form the sampler must reproduce.
    fresh = CalmDiffusionHead(tiny_calm_config(head_type="diffusion", diffusion_num_steps=1))
    for layer in zero_init_layers(fresh):  # as CalmPreTrainedModel._init_weights leaves them
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    expected = noise / fresh.alpha_bar[999].sqrt()
    torch.testing.assert_close(fresh.sample(h, noise=noise), expected)
