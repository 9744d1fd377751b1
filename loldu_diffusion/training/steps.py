"""One training step's pieces as functions a test can call: the batch (instance images, plus
class images under prior preservation), the noised latents, and the DreamBooth loss. All
randomness comes from the step's own generator, so a step is the same whatever ran before it
(resume, processes, the methods' own random inits)."""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .data import ImageSet, sample_indices


class LatentCache:
    """VAE posterior (mean, std) per (image, flip): the VAE encoder runs once per image, not
    once per step. Off when random crops make every step's pixels different."""

    def __init__(self, m, images: ImageSet, resolution, args, device, dtype):
        self.m, self.images, self.res, self.args, self.device, self.dtype = m, images, resolution, args, device, dtype
        self.enabled = not images.needs_random_crop(resolution, args.center_crop)
        self.cache = {}

    @torch.no_grad()
    def _posterior(self, pixels):
        dist = self.m.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def latents(self, indices, flips, gen):
        if self.enabled:
            for i, f in zip(indices, flips):
                if (i, f) not in self.cache:
                    mean, std = self._posterior(self.images.crop(i, self.res, True, f, gen)[None])
                    self.cache[(i, f)] = (mean[0], std[0])
            mean = torch.stack([self.cache[(i, f)][0] for i, f in zip(indices, flips)])
            std = torch.stack([self.cache[(i, f)][1] for i, f in zip(indices, flips)])
        else:
            pixels = torch.stack([self.images.crop(i, self.res, self.args.center_crop, f, gen) for i, f in zip(indices, flips)])
            mean, std = self._posterior(pixels)
        eps = torch.randn(mean.shape, generator=gen).to(mean.device)
        return (mean + std * eps) * self.m.vae.config.scaling_factor


def sample_batch(gen, images: ImageSet, cache: LatentCache, batch: int, random_flip: bool):
    """(latents [B, C, h, w], captions) for `batch` images drawn with `gen`."""
    idx = sample_indices(len(images), batch, gen)
    flips = [bool(random_flip and torch.rand(1, generator=gen) < 0.5) for _ in idx]
    return cache.latents(idx, flips, gen), [images.captions[i] for i in idx]


def noised(latents, gen, sched, noise_offset: float, device, dtype):
    """(noisy latents, the model's target, timesteps) for one batch; `latents` already scaled."""
    latents = latents.to(device, dtype)
    noise = torch.randn(latents.shape, generator=gen)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
    noise = noise.to(device, dtype)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
    noisy = sched.add_noise(latents, noise, t)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    return types.SimpleNamespace(noisy=noisy, target=target, t=t)


def dreambooth_loss(pred, target, t, sched, snr_gamma: float | None = None, prior_loss_weight: float = 1.0,
                    with_prior: bool = False):
    """MSE on the instance half, plus prior_loss_weight × MSE on the class half when the batch
    carries class images (instance first, class second); min-SNR-γ weighting when asked."""
    from diffusers.training_utils import compute_snr

    pred, target = pred.float(), target.float()
    prior = torch.zeros((), device=pred.device)
    if with_prior:
        pred, pred_prior = pred.chunk(2)
        target, target_prior = target.chunk(2)
        t = t.chunk(2)[0]
        prior = F.mse_loss(pred_prior, target_prior)
    if snr_gamma is None:
        loss = F.mse_loss(pred, target)
    else:
        snr = compute_snr(sched, t)
        w = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
        w = w / snr if sched.config.prediction_type == "epsilon" else w / (snr + 1)
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
    return loss + prior_loss_weight * prior
