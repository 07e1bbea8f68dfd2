"""Generative heads of CALM and the energy score (arXiv 2510.27688, section "Likelihood-Free Language Modeling").

A head owns its training loss (`loss`), its sampler (`sample`) and its noise (`noise_size`, `draw_noise`), as in
MAR/DiT, so callers (generation, BrierLM) never need to know which head they drive. All are conditioned on the
backbone's hidden state h of the previous step.

Shapes follow the legend of `modeling_calm` (P positions, S head samples, M target samples, E noise size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_calm import DIFFUSION_TRAIN_STEPS, CalmConfig


__all__ = [
    "CALM_HEADS",
    "CalmDiffusionHead",
    "CalmEnergyHead",
    "CalmFlowHead",
    "CalmHeadLoss",
    "CalmZeroInitLinear",
    "energy_score",
    "energy_score_ref",
    "zero_init_layers",
]


# Squared distances below this are treated as this value before taking powers: d^beta has an infinite
# derivative at d = 0 (identical samples, e.g. a zero-initialised head), which would turn gradients into NaN.
_MIN_SQUARED_DISTANCE = 1e-12


def energy_score(
    samples: torch.Tensor,
    target_mean: torch.Tensor,
    target_log_std: torch.Tensor,
    beta: float = 1.0,
    num_target_samples: int = 100,
    target_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Energy score of model samples against the target posterior N(mean, diag(exp(log_std))^2).

    With head samples x_1..x_S and target samples y_m = mean + exp(log_std) * eps_m, m = 1..M:

        fidelity  = 1/(S M)     sum_{s,m}    ||x_s - y_m||^beta
        diversity = 1/(S (S-1)) sum_{s != k} ||x_s - x_k||^beta
        score     = diversity - 2 * fidelity          (higher is better; the loss is -score)

    The score is a strictly proper scoring rule for beta in (0, 2), estimated without bias by these sums.
    Distances are computed in float32 through Gram matrices ([P, S, M] and [P, S, S]), never materialising
    [P, S, M, Z] differences.

    Args:
        samples: `[S, P, Z]` head samples (S >= 2).
        target_mean, target_log_std: `[P, Z]` posterior of the target chunk.
        beta: exponent of the distances.
        num_target_samples: M, used when `target_noise` is None.
        target_noise: explicit eps `[M, P, Z]` (reproducibility and parity tests).
        generator: torch.Generator for eps.
    Returns:
        `(score, fidelity, diversity)`, each `[P]`.
    """
    if samples.dim() != 3 or samples.shape[0] < 2:
        raise ValueError(f"`samples` must be [S>=2, P, Z], got {tuple(samples.shape)}.")
    if target_mean.shape != samples.shape[1:] or target_log_std.shape != samples.shape[1:]:
        raise ValueError(
            f"target mean/log_std shapes {tuple(target_mean.shape)}/{tuple(target_log_std.shape)} must equal "
            f"the samples' [P, Z] = {tuple(samples.shape[1:])}."
        )
    x = samples.float().transpose(0, 1)  # [P, S, Z]
    mean, std = target_mean.float(), torch.exp(target_log_std.float())
    if target_noise is None:
        target_noise = torch.randn(
            (num_target_samples, *mean.shape), device=mean.device, dtype=torch.float32, generator=generator
        )
    y = (mean + target_noise.float() * std).transpose(0, 1)  # [P, M, Z]
    half_beta = beta / 2.0

    def pairwise_power(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # ||a_i - b_j||^beta for all pairs: [P, I, Z] x [P, J, Z] -> [P, I, J]
        squared = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(-2) - 2 * a @ b.transpose(-1, -2)
        return squared.clamp_min(_MIN_SQUARED_DISTANCE).pow(half_beta)

    num_samples = x.shape[1]
    fidelity = pairwise_power(x, y).mean(dim=(-1, -2))  # [P]
    between = pairwise_power(x, x)  # [P, S, S]
    # Zero the diagonal by a product rather than a boolean index: no data-dependent shape, so torch.compile keeps
    # the whole loss in one graph. (The clamp above keeps the diagonal's gradient finite before the zeroing.)
    off_diagonal = 1.0 - torch.eye(num_samples, dtype=between.dtype, device=x.device)
    diversity = (between * off_diagonal).sum(dim=(-1, -2)) / (num_samples * (num_samples - 1))
    return diversity - 2 * fidelity, fidelity, diversity


def energy_score_ref(samples, target_mean, target_log_std, beta=1.0, target_noise=None):
    """Slow, obviously correct double loop over sample pairs (tests compare `energy_score` with it)."""
    num_samples, positions, _ = samples.shape
    y = target_mean + target_noise * torch.exp(target_log_std)  # [M, P, Z]
    scores = torch.empty(positions, dtype=torch.float64)
    for n in range(positions):
        fid = sum(
            torch.linalg.vector_norm(samples[s, n].double() - y[m, n].double()) ** beta
            for s in range(num_samples)
            for m in range(y.shape[0])
        ) / (num_samples * y.shape[0])
        div = sum(
            torch.linalg.vector_norm(samples[s, n].double() - samples[k, n].double()) ** beta
            for s in range(num_samples)
            for k in range(num_samples)
            if s != k
        ) / (num_samples * (num_samples - 1))
        scores[n] = div - 2 * fid
    return scores


@dataclass
class CalmHeadLoss:
    """Per-position head loss `[P]` and, for the energy head, its two terms (for logging)."""

    loss: torch.Tensor
    fidelity: torch.Tensor | None = None
    diversity: torch.Tensor | None = None
    samples: torch.Tensor | None = None


class CalmEnergyBlock(nn.Module):
    """Residual block `x + down_proj(SiLU(g) * v)`, `(g, v) = MLP([LayerNorm(x), c])` (conditioning c)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.fc1 = nn.Linear(2 * hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 2 * hidden)
        self.down_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        # The condition may be one per position ([P, D] for x [S, P, D]): broadcast it over the samples. (fc1 is
        # called as a module, never through its weight, so LoRA adapters and ZeRO-3 parameter gathering see it.)
        h = torch.cat([self.norm(x), condition.expand_as(x)], dim=-1)
        h = self.fc3(F.silu(self.fc2(F.silu(self.fc1(h)))))
        gate, value = h.chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * value)


class CalmZeroInitLinear(nn.Linear):
    """A Linear that starts at zero (`CalmPreTrainedModel._init_weights`): a head's output projection, so that the
    head begins by predicting the mean latent and its first updates do not fight a random projection, and the flow
    head's adaLN modulations, so that every block starts as the identity. Otherwise a plain `nn.Linear`."""


class CalmHeadOutputLayer(nn.Module):
    """LayerNorm -> Linear(D, D) -> SiLU -> Linear(D, Z), the last Linear zero-initialised."""

    def __init__(self, hidden: int, latent: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = CalmZeroInitLinear(hidden, latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(self.norm(x))))


class CalmEnergyHead(nn.Module):
    """Single-step generative head trained with the energy score (the paper's default).

    The sample is a deterministic function of uniform noise u ~ U[-0.5, 0.5]^E and the hidden state h:
    x = noise embedding, c = hidden embedding, then residual blocks on x conditioned on c.
    """

    def __init__(self, config: CalmConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.head_norm_eps
        self.noise_size = config.noise_size
        self.latent_size = config.latent_size
        self.num_samples = config.num_samples
        self.num_target_samples = config.num_target_samples
        self.beta = float(config.beta)
        self.noise_proj = nn.Linear(config.noise_size, hidden)
        self.noise_norm = nn.LayerNorm(hidden, eps=eps)
        self.hidden_proj = nn.Linear(hidden, hidden)
        self.hidden_norm = nn.LayerNorm(hidden, eps=eps)
        self.blocks = nn.ModuleList(CalmEnergyBlock(hidden, eps) for _ in range(config.num_mlp_layers))
        self.output = CalmHeadOutputLayer(hidden, config.latent_size, eps)

    def draw_noise(self, shape, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The head's noise u ~ U[-0.5, 0.5)^E, float32, of shape `[*shape, E]`."""
        return torch.rand((*shape, self.noise_size), device=device, generator=generator) - 0.5

    def sample(
        self,
        hidden_states: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One latent per hidden state: `[..., D]` -> `[..., Z]`.

        Args:
            hidden_states: `[..., D]` conditioning states.
            noise: explicit uniform noise `[..., E]` in [-0.5, 0.5) (reproducibility); drawn when None.
            generator: torch.Generator for the noise.
        """
        if noise is None:
            noise = self.draw_noise(hidden_states.shape[:-1], device=hidden_states.device, generator=generator)
        elif noise.shape != (*hidden_states.shape[:-1], self.noise_size):
            raise ValueError(
                f"`noise` must have shape {(*hidden_states.shape[:-1], self.noise_size)}, got {tuple(noise.shape)}."
            )
        return self._transform(noise, hidden_states)

    def _transform(self, noise: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Noise `[..., E]` -> latent `[..., Z]`, conditioned on hidden states that broadcast to the noise's leading
        shape (e.g. `[P, D]` for `[S, P, E]`): the conditioning path then runs once per position, not per sample."""
        x = self.noise_norm(self.noise_proj(noise.to(hidden_states.dtype)))
        condition = self.hidden_norm(self.hidden_proj(hidden_states))
        for block in self.blocks:
            x = block(x, condition)
        return self.output(x)

    def loss(
        self,
        hidden_states: torch.Tensor,
        target_mean: torch.Tensor,
        target_log_std: torch.Tensor,
        noise: torch.Tensor | None = None,
        target_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> CalmHeadLoss:
        """Negative energy score per position.

        Args:
            hidden_states: `[P, D]`; target_mean, target_log_std: `[P, Z]`.
            noise: `[S, P, E]` head noise; target_noise: `[M, P, Z]` eps of the target samples.
        """
        num = hidden_states.shape[0]
        if noise is None:
            noise = self.draw_noise((self.num_samples, num), device=hidden_states.device, generator=generator)
        elif noise.dim() != 3 or noise.shape[1:] != (num, self.noise_size):
            raise ValueError(f"`noise` must have shape [S, {num}, {self.noise_size}], got {tuple(noise.shape)}.")
        samples = self._transform(noise, hidden_states)  # [S, P, Z]; h [P, D] broadcasts over the S samples
        score, fidelity, diversity = energy_score(
            samples,
            target_mean,
            target_log_std,
            beta=self.beta,
            num_target_samples=self.num_target_samples,
            target_noise=target_noise,
            generator=generator,
        )
        return CalmHeadLoss(loss=-score, fidelity=fidelity, diversity=diversity, samples=samples)


def _timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of flow times t in [0, 1] (scaled by 1000 as in DiT): `[P]` -> `[P, dim]`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[..., None] * freqs
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class CalmFlowBlock(nn.Module):
    """adaLN-Zero residual MLP block: the condition sets shift, scale and gate of each block."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, eps=eps, elementwise_affine=False)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.modulation = CalmZeroInitLinear(hidden, 3 * hidden)  # every block starts as the identity

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(F.silu(condition)).chunk(3, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        return x + gate * self.fc2(F.silu(self.fc1(h)))


class CalmFlowHead(nn.Module):
    """Flow-matching head (rectified flow): learns the velocity from noise x0 ~ N(0, I) to the target latent.

    Training: t ~ U(0, 1), x_t = (1 - t) x0 + t y, loss = ||v(x_t, t, h) - (y - x0)||^2 summed over Z, with y a
    sample of the target posterior. Sampling: `flow_num_steps` Euler steps from t = 0 to 1.
    """

    def __init__(self, config: CalmConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.head_norm_eps
        self.latent_size = config.latent_size
        self.noise_size = config.latent_size  # the noise is the start point x0 of the flow, a latent
        self.num_steps = config.flow_num_steps
        self.input_proj = nn.Linear(config.latent_size, hidden)
        self.time_proj = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.hidden_proj = nn.Linear(hidden, hidden)
        self.blocks = nn.ModuleList(CalmFlowBlock(hidden, eps) for _ in range(max(config.num_mlp_layers, 1)))
        self.output = CalmHeadOutputLayer(hidden, config.latent_size, eps)
        self.hidden_size = hidden

    def draw_noise(self, shape, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The head's noise x0 ~ N(0, I), float32, of shape `[*shape, Z]`."""
        return torch.randn((*shape, self.noise_size), device=device, generator=generator)

    def _sampling_steps(self, num_steps: int | None, maximum: int | None = None) -> int:
        steps = self.num_steps if num_steps is None else num_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or (maximum and steps > maximum):
            rule = f"in [1, {maximum}]" if maximum else ">= 1"
            raise ValueError(f"`num_steps` must be an integer {rule}, got {steps!r}.")
        return steps

    def _start_point(self, hidden_states: torch.Tensor, noise: torch.Tensor | None, generator) -> torch.Tensor:
        """The sampler's start `[..., Z]` (float32): the given noise, checked, or a fresh draw."""
        shape = (*hidden_states.shape[:-1], self.latent_size)
        if noise is None:
            noise = self.draw_noise(shape[:-1], device=hidden_states.device, generator=generator)
        elif noise.shape != shape:
            raise ValueError(f"`noise` must have shape {shape}, got {tuple(noise.shape)}.")
        return noise.float()

    def _target_and_noise(self, target_mean, target_log_std, noise, target_noise, generator):
        """A sample y of the target posterior and the head's noise, both `[P, Z]` float32 (drawn in this order)."""
        mean, std = target_mean.float(), torch.exp(target_log_std.float())
        if target_noise is None:
            target_noise = torch.randn(mean.shape, device=mean.device, generator=generator)
        target = mean + target_noise.reshape(mean.shape).float() * std
        if noise is None:
            noise = self.draw_noise(mean.shape[:-1], device=mean.device, generator=generator)
        return target, noise.float()

    def velocity(self, x: torch.Tensor, t: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """v(x_t, t | h): `x [..., Z]`, `t [...]`, `hidden_states [..., D]` -> `[..., Z]`."""
        condition = self.hidden_proj(hidden_states) + self.time_proj(
            _timestep_embedding(t, self.hidden_size).to(hidden_states.dtype)
        )
        h = self.input_proj(x.to(hidden_states.dtype))
        for block in self.blocks:
            h = block(h, condition)
        return self.output(h)

    def sample(
        self,
        hidden_states: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """`[..., D]` -> `[..., Z]` by Euler integration; `noise` is the start point x0 `[..., Z]`."""
        steps = self._sampling_steps(num_steps)
        x = self._start_point(hidden_states, noise, generator)
        shape = x.shape
        dt = 1.0 / steps
        for i in range(steps):
            t = torch.full(shape[:-1], i * dt, device=x.device)
            x = x + dt * self.velocity(x, t, hidden_states).float()
        return x.to(hidden_states.dtype)

    def loss(
        self,
        hidden_states: torch.Tensor,
        target_mean: torch.Tensor,
        target_log_std: torch.Tensor,
        noise: torch.Tensor | None = None,
        target_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> CalmHeadLoss:
        """Flow-matching loss per position `[P]`; `noise` is x0 `[P, Z]`, `target_noise` the eps `[P, Z]`."""
        target, noise = self._target_and_noise(target_mean, target_log_std, noise, target_noise, generator)
        t = torch.rand(target.shape[:-1], device=target.device, generator=generator)
        x_t = (1 - t[..., None]) * noise + t[..., None] * target
        prediction = self.velocity(x_t, t, hidden_states).float()
        loss = (prediction - (target - noise)).pow(2).sum(-1)
        return CalmHeadLoss(loss=loss)


class CalmDiffusionHead(CalmFlowHead):
    """Diffusion head (denoising, noise prediction), the paper's third head: the same adaLN network as the flow
    head, read as eps(x_t, t | h).

    Training: a noise level t ~ U{0, ..., 999} of a cosine schedule (alpha_bar(t) = cos^2((t/1000 + s) / (1 + s)
    * pi/2), s = 0.008), x_t = sqrt(alpha_bar) y + sqrt(1 - alpha_bar) eps with y a sample of the target posterior,
    loss = ||eps(x_t, t, h) - eps||^2 summed over Z. Sampling: deterministic DDIM over `diffusion_num_steps`
    evenly spaced levels from t = 999 down to 0, starting at the noise x_T ~ N(0, I) (the head's `draw_noise`), so
    a sample is a function of its noise like the other heads'. The paper found this head the weakest, citing the
    many steps its sampler needs; `diffusion_num_steps` trades quality for speed.
    """

    def __init__(self, config: CalmConfig):
        super().__init__(config)
        self.num_steps = config.diffusion_num_steps
        # The schedule in Python floats (models are also built on the meta device, where tensors hold no values).
        offset = 0.008
        curve = [math.cos((t / DIFFUSION_TRAIN_STEPS + offset) / (1 + offset) * math.pi / 2) ** 2
                 for t in range(DIFFUSION_TRAIN_STEPS + 1)]
        self._alpha_bar_values = [min(max(c / curve[0], 1e-5), 1.0) for c in curve[1:]]  # level t = 0..999
        self.register_buffer("alpha_bar", torch.tensor(self._alpha_bar_values), persistent=False)

    def _levels(self, t: torch.Tensor) -> torch.Tensor:
        return self.alpha_bar.to(t.device)[t]

    def sample(
        self,
        hidden_states: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """`[..., D]` -> `[..., Z]` by DDIM from x_T = `noise` `[..., Z]` (drawn when None)."""
        steps = self._sampling_steps(num_steps, maximum=DIFFUSION_TRAIN_STEPS)
        x = self._start_point(hidden_states, noise, generator)
        shape = x.shape
        # Python numbers, not tensors: the loop unrolls into one graph under torch.compile (no host sync).
        last = DIFFUSION_TRAIN_STEPS - 1
        levels = [round(last * (1 - i / (steps - 1))) if steps > 1 else last for i in range(steps)]
        for i, level in enumerate(levels):
            a = self._alpha_bar_values[level]
            a_next = self._alpha_bar_values[levels[i + 1]] if i + 1 < steps else 1.0
            t = torch.full(shape[:-1], level / DIFFUSION_TRAIN_STEPS, device=x.device)
            eps = self.velocity(x, t, hidden_states).float()
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
        return x.to(hidden_states.dtype)

    def loss(
        self,
        hidden_states: torch.Tensor,
        target_mean: torch.Tensor,
        target_log_std: torch.Tensor,
        noise: torch.Tensor | None = None,
        target_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> CalmHeadLoss:
        """Noise-prediction loss per position `[P]`; `noise` is eps `[P, Z]`, `target_noise` the posterior's eps."""
        target, noise = self._target_and_noise(target_mean, target_log_std, noise, target_noise, generator)
        level = torch.randint(0, DIFFUSION_TRAIN_STEPS, target.shape[:-1], device=target.device, generator=generator)
        a = self._levels(level)[..., None]
        x_t = a.sqrt() * target + (1 - a).sqrt() * noise
        prediction = self.velocity(x_t, level.float() / DIFFUSION_TRAIN_STEPS, hidden_states).float()
        return CalmHeadLoss(loss=(prediction - noise).pow(2).sum(-1))


CALM_HEADS = {"energy": CalmEnergyHead, "flow": CalmFlowHead, "diffusion": CalmDiffusionHead}



def zero_init_layers(module: nn.Module) -> list[CalmZeroInitLinear]:
    """The zero-initialised layers inside `module` (tests and benchmarks give them random weights to get a
    non-degenerate untrained model)."""
    return [sub for sub in module.modules() if isinstance(sub, CalmZeroInitLinear)]
