"""Train the embedded base model and its judge from scratch on the toy world.

    python -m loldu_diffusion.toy.train_base [--out assets] [--quick]

Stages (each cached in --work, so a killed run picks up at the stage it was in):
  1. judge      CNN attribute classifier on fresh renders
  2. tokenizer  CLIP BPE over the world's words (+ rare identifiers such as "sks")
  3. vae        AutoencoderKL, 64×64 RGB ↔ 16×16×4
  4. latents    the training set encoded once, so the UNet never runs the VAE
  5. unet       UNet2DConditionModel + CLIPTextModel, jointly, v-prediction on a
                zero-terminal-SNR schedule, 10 % empty captions for classifier-free guidance
Then the pipeline is written in diffusers format (fp16 weights) under OUT/tiny-sd.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..assets import write_toy_world_marker
from ..io import atomic_save_dir
from . import world
from .judge import ATTRIBUTES, Judge, labels_of, save_judge
from .models import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, build_tokenizer, text_config_for

FULL = dict(judge_steps=1500, vae_steps=3000, n_images=24000, unet_steps=6000, batch=64)
QUICK = dict(judge_steps=60, vae_steps=30, n_images=256, unet_steps=30, batch=16)


def _cosine_lr(opt, total, warmup=100):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )


def _fit(params, loss_fn, steps: int, lr: float, desc: str, weight_decay: float = 0.0, warmup: int = 100, clip: float | None = None):
    """AdamW + warm-up/cosine schedule over `steps` calls of loss_fn(step), with a progress bar."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr, weight_decay=weight_decay)
    sched = _cosine_lr(opt, steps, warmup=warmup)
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")


def _batch(seed: int, n: int, drop: float = 0.0):
    data = world.render_dataset(n, seed, drop)
    images = torch.from_numpy(np.stack([d[0] for d in data]))
    return images, [d[1] for d in data], [d[2] for d in data]


def soften(images: torch.Tensor, max_sigma: float = 1.6) -> torch.Tensor:
    """Gaussian blur of a random width per image (0 … max_sigma px) plus pixel noise: generated
    images are never as crisp as renders, and a judge trained on crisp renders alone reads a
    soft-edged star as a ring."""
    b = images.shape[0]
    sigma = torch.rand(b) * max_sigma + 1e-3
    x = torch.arange(-3, 4, dtype=images.dtype)
    k = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(-1, keepdim=True)).repeat_interleave(3, 0)  # (B·3, 7)
    flat = F.pad(images.reshape(1, b * 3, *images.shape[2:]), (3, 3, 3, 3), mode="replicate")
    flat = F.conv2d(flat, k[:, None, None, :], groups=b * 3)  # along x
    flat = F.conv2d(flat, k[:, None, :, None], groups=b * 3)  # along y
    return flat.reshape(images.shape) + 0.06 * torch.randn_like(images)


def train_judge(steps: int, seed: int) -> Judge:
    torch.manual_seed(seed)
    judge = Judge()

    def loss_fn(step):
        images, _, scenes = _batch(seed * 100003 + step, 64)
        images = soften(images)
        labels = labels_of(scenes)
        logits = judge(images)
        return sum(F.cross_entropy(logits[k], labels[k]) for k in ATTRIBUTES)

    _fit(judge.parameters(), loss_fn, steps, 2e-3, "judge", weight_decay=1e-4)
    return judge.eval()


def judge_accuracy(judge: Judge, n: int = 512, seed: int = 987654, softened: bool = False) -> dict[str, float]:
    images, _, scenes = _batch(seed, n)
    if softened:
        torch.manual_seed(seed)
        images = soften(images)
    read = judge.read(images)
    return {k: float(np.mean([r[k] == getattr(s, k) for r, s in zip(read, scenes)])) for k in ATTRIBUTES}


def train_vae(steps: int, seed: int, batch: int = 16, init_from: str | None = None, lr: float = 1e-3):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(init_from, torch_dtype=torch.float32) if init_from else AutoencoderKL(**VAE_CONFIG)

    def loss_fn(step):
        images, _, _ = _batch(seed * 7919 + step, batch)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / images[0].numel()
        return F.mse_loss(recon, images) + 0.5 * F.l1_loss(recon, images) + 1e-4 * kl

    _fit(vae.parameters(), loss_fn, steps, lr, "vae")
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae, n: int, seed: int):
    """(mean, std) of the latents of n renders; scenes kept for captioning at train time."""
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    means, stds = [], []
    for i in tqdm(range(0, n, 256), desc="latents"):
        images = torch.from_numpy(np.stack([world.to_tensor(world.render(s)) for s in scenes[i : i + 256]]))
        dist = vae.encode(images).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds), scenes


def warm_start(unet, text_encoder, base_path: str) -> list[str]:
    """Initialise from an earlier base: every UNet / text-encoder tensor whose name and shape
    match is copied; transformers the earlier UNet did not have get a zero output projection,
    so the warm-started model starts out computing exactly what the earlier one did.
    Returns the names of the UNet tensors that were not copied."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    old_unet = UNet2DConditionModel.from_pretrained(os.path.join(base_path, "unet"), torch_dtype=torch.float32)
    old_te = CLIPTextModel.from_pretrained(os.path.join(base_path, "text_encoder"), torch_dtype=torch.float32)
    text_encoder.load_state_dict(old_te.state_dict())
    old, new = old_unet.state_dict(), unet.state_dict()
    fresh = [k for k, v in new.items() if k not in old or old[k].shape != v.shape]
    unet.load_state_dict({k: old[k] for k in new if k not in fresh}, strict=False)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("proj_out") and f"{name}.weight" in fresh:
                module.weight.zero_()
                module.bias.zero_()
    return fresh


def train_unet(tokenizer, latents_mean, latents_std, scenes, steps, batch, seed, scaling, init_from=None):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    rng = random.Random(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(text_config_for(tokenizer))
    if init_from:
        fresh = warm_start(unet, text_encoder, init_from)
        print(f"warm start from {init_from}: {len(fresh)} UNet tensors new")
    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    token_cache: dict[str, list[int]] = {}

    def tokens(text):
        if text not in token_cache:
            token_cache[text] = tokenizer(
                text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
            ).input_ids
        return token_cache[text]

    def loss_fn(step):
        idx = torch.tensor(rng.sample(range(len(scenes)), batch))
        captions = ["" if rng.random() < 0.1 else world.caption(scenes[i], rng, drop=0.2) for i in idx.tolist()]
        ids = torch.tensor([tokens(c) for c in captions])
        latents = (latents_mean[idx] + latents_std[idx] * torch.randn_like(latents_mean[idx])) * scaling
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        return F.mse_loss(unet(noisy, t, text_encoder(ids)[0]).sample, noise_scheduler.get_velocity(latents, noise, t))

    params = list(unet.parameters()) + list(text_encoder.parameters())
    _fit(params, loss_fn, steps, 1e-3, "unet+text", weight_decay=1e-2, warmup=200, clip=1.0)
    return unet.eval(), text_encoder.eval()


def save_pipeline(out_dir, vae, unet, text_encoder, tokenizer):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    # UNet and VAE in fp16 halve the repo; the text encoder stays fp32 because transformers
    # loads weights in their stored dtype by default while diffusers loads fp32, and a plain
    # `from_pretrained(path)` must give one dtype throughout.
    unet.to(torch.float16)
    vae.to(torch.float16)
    def save(folder):
        pipe.save_pretrained(folder)
        write_toy_world_marker(folder)  # the trainer's embedded defaults and judge apply to this base

    atomic_save_dir(save, out_dir, overwrite=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="assets folder to write tiny-sd/ and judge/ into (default: the repo's assets/)")
    p.add_argument("--work", default=None, help="folder for stage caches (default: OUT/.train_base_work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (for tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokenizer_from", default=None, help="take the tokenizer from this folder (e.g. assets/tiny-sd/tokenizer): "
                   "the tokenizers library's BPE trainer breaks ties differently from run to run")
    p.add_argument("--vae_from", default=None, help="take the VAE from this diffusers VAE folder (e.g. assets/tiny-sd/vae) instead of training one")
    p.add_argument("--init_from", default=None, help="warm-start the VAE, UNet and text encoder from this pipeline folder "
                   "(tensors of the same name and shape; new transformers start as identity)")
    p.add_argument("--vae_steps", type=int, default=None, help=f"VAE training steps (default {FULL['vae_steps']})")
    p.add_argument("--unet_steps", type=int, default=None, help=f"UNet training steps (default {FULL['unet_steps']})")
    p.add_argument("--retrain_judge", action="store_true", help="train the judge even if OUT/judge exists")
    args = p.parse_args(argv)
    from . import ASSETS

    out = args.out or ASSETS
    work = args.work or os.path.join(out, ".train_base_work")
    os.makedirs(work, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    t0 = time.time()

    judge_path = os.path.join(out, "judge")
    if args.retrain_judge or not os.path.exists(os.path.join(judge_path, "judge.safetensors")):
        judge = train_judge(cfg["judge_steps"], args.seed)
        n = 128 if args.quick else 1024
        print("judge accuracy on fresh renders:", judge_accuracy(judge, n), "softened:", judge_accuracy(judge, n, softened=True))
        save_judge(judge, judge_path)

    tok_path = os.path.join(work, "tokenizer")
    if args.tokenizer_from:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_from)
    else:
        tokenizer = build_tokenizer(tok_path)

    from diffusers import AutoencoderKL

    vae_path = os.path.join(work, "vae")
    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from, torch_dtype=torch.float32).eval()
    elif os.path.exists(os.path.join(vae_path, "config.json")):
        vae = AutoencoderKL.from_pretrained(vae_path).eval()
    else:
        vae_init = os.path.join(args.init_from, "vae") if args.init_from else None
        vae = train_vae(args.vae_steps or cfg["vae_steps"], args.seed, init_from=vae_init, lr=5e-4 if vae_init else 1e-3)
        vae.save_pretrained(vae_path)

    lat_path = os.path.join(work, "latents.pt")
    if os.path.exists(lat_path):
        mean, std, scenes = torch.load(lat_path, weights_only=False)
    else:
        mean, std, scenes = encode_dataset(vae, cfg["n_images"], args.seed + 1)
        torch.save((mean, std, scenes), lat_path)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)

    unet, text_encoder = train_unet(
        tokenizer, mean, std, scenes, args.unet_steps or cfg["unet_steps"], cfg["batch"], args.seed, scaling, args.init_from
    )
    save_pipeline(os.path.join(out, "tiny-sd"), vae, unet, text_encoder, tokenizer)
    print(f"base model written to {os.path.join(out, 'tiny-sd')} in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
