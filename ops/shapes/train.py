"""Train the small pixel-space text-to-image model shipped in ``workers/models/shapes``.

Usage (the defaults reproduce the shipped model)::

    python -m ops.shapes.train --out workers/models/shapes --seed 0

Data recipe (generated on the fly, never stored):
  * one scene per sample from :func:`ops.shapes.scene.random_scene`: background and shape
    colour drawn from an 8-colour palette (always different), shape in {circle, square,
    triangle}, size in {small, large}, position in a 3x3 grid;
  * rendered with hard edges at 32x32 by :func:`ops.shapes.scene.render_array`, scaled to
    [-1, 1];
  * captioned by :func:`ops.shapes.scene.caption` (9 templates x colour/shape/size/position
    synonyms x adjective order); the caption is replaced by "" with probability 0.1 for
    classifier-free guidance.

Model: a word-level ``CLIPTokenizer`` (BPE merges built so that every caption word is one
token; unknown words fall back to byte symbols), a small ``CLIPTextModel`` and a
``UNet2DConditionModel`` working directly on 3-channel pixels plus two x/y coordinate channels
(``model_index.json`` → ``reprise.input_coords``), four levels down to 4x4, cross-attention
(``only_cross_attention``: no self-attention) at 8x8, 4x4 and the mid block, an attention-pooled
text embedding added to the time embedding (``addition_embed_type="text"``) and scale-shift
conditioning of every resnet. Two stages:

1. ``--text-pretrain`` steps (400, about a minute): the text encoder learns to make background,
   shape colour, shape, size and position linearly readable from its end/padding states
   (:func:`pretrain_text_encoder`; held-out accuracy 1.000 on every attribute). Trained jointly
   from scratch instead, it never separated the position words.
2. The U-Net, with the text encoder frozen (``--text-lr 0``): v-prediction, cosine
   ("squaredcos_cap_v2") schedule with 1000 steps, 30 % of the samples at t >= 500 where the
   layout is decided, AdamW, linear warm-up then cosine decay over the wall-clock budget, EMA of
   the weights; the saved model holds the EMA weights.

Conditioning is ``text_encoder(input_ids)[0]`` on ids padded to ``model_max_length`` with no
attention mask, exactly what a StableDiffusionPipeline-style loop computes.
A checkpoint of the full pipeline directory is written every ``--ckpt-minutes`` minutes and at
the end, so an interrupted run still leaves a usable model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ops.shapes import scene as sc

MODEL_MAX_LENGTH = 32
DIFFUSERS_VERSION = "0.42.1"

from workers.model_loading import _bytes_to_unicode  # noqa: E402  (GPT-2's byte table, shared with the built-in tokenizer)

# ----------------------------------------------------------------------------- tokenizer
_PRETOK = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def caption_words(n: int = 20000, seed: int = 1234) -> list[str]:
    """All pre-tokenized words that the caption generator emits (plus a few prompt words)."""
    rng = np.random.default_rng(seed)
    words: Counter[str] = Counter()
    for _ in range(n):
        words.update(_PRETOK.findall(sc.caption(sc.random_scene(rng), rng).lower()))
    extra = "a an the of with in on at and image picture photo shape corner centre center middle".split()
    words.update(extra)
    return sorted(words)


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Byte-level base vocabulary plus BPE merges learnt until every word is one symbol."""
    b2u = _bytes_to_unicode()
    base = list(b2u.values())
    vocab_list = base + [c + "</w>" for c in base]
    segs = {w: [b2u[b] for b in w.encode()] for w in words}
    for s in segs.values():
        s[-1] = s[-1] + "</w>"
    merges: list[str] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for s in segs.values():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # deterministic tie-break
        merges.append(f"{best[0]} {best[1]}")
        new = best[0] + best[1]
        vocab_list.append(new)
        for w, s in segs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    seen: dict[str, int] = {}
    for t in vocab_list:
        if t not in seen:
            seen[t] = len(seen)
    return seen, merges


def build_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab_and_merges(caption_words())
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=MODEL_MAX_LENGTH)
    return tok


# ----------------------------------------------------------------------------- models
TEXT_CFG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
UNET_CFG = dict(
    block_out_channels=(32, 64, 64),
    # conv only at 32x32; cross-attention at 16x16 and 8x8 (and in the mid block)
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=2,  # diffusers' legacy name: this is the number of heads
    norm_num_groups=8,
    only_cross_attention=True,
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
)
# "deep": one more level down to 4x4, where a single zero-padded 3x3 conv already tells a pixel
# which region of the image it covers, so "top left" can be bound to pixels there; the 4x4
# cross-attention and mid block are cheap.  Cross-attention at 8x8 and 4x4 (and mid).
UNET_CFG_DEEP = dict(
    UNET_CFG,
    block_out_channels=(32, 64, 64, 96),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)
# the same with cross-attention at 16x16 too
UNET_CFG_DEEP16 = dict(
    UNET_CFG_DEEP,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
# the deep layout with the (pooled-text + time) embedding scaling each resnet's normalised features
# instead of only shifting them: with coordinate channels a text-chosen scale of a coordinate-derived
# feature places something left or right in one step, where a shift alone cannot
UNET_CFG_DEEP_SS = dict(UNET_CFG_DEEP, resnet_time_scale_shift="scale_shift")
# three levels (32x32 conv only, cross-attention at 16x16 and 8x8 + mid) with scale-shift time/text
# conditioning; meant for coordinate channels and a pre-trained text encoder (see --text-pretrain)
UNET_CFG_SS = dict(UNET_CFG, block_out_channels=(32, 64, 96), resnet_time_scale_shift="scale_shift")
ARCHS = {
    "base": UNET_CFG,
    "deep": UNET_CFG_DEEP,
    "deep16": UNET_CFG_DEEP16,
    "deep-ss": UNET_CFG_DEEP_SS,
    "ss": UNET_CFG_SS,
}


def build_text_encoder(tok, text_cfg: dict | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=(text_cfg or TEXT_CFG)["hidden_size"],
        **(text_cfg or TEXT_CFG),
    )
    return CLIPTextModel(cfg)


def build_unet(cross_dim: int, size: int = 32, unet_cfg: dict | None = None, coords: bool = False):
    from diffusers import UNet2DConditionModel

    cfg = dict(UNET_CFG if unet_cfg is None else unet_cfg)
    return UNet2DConditionModel(
        sample_size=size, in_channels=3 + 2 * coords, out_channels=3, cross_attention_dim=cross_dim, **cfg
    )


def unet_input(unet, sample):
    """The sample, plus the coordinate channels when the U-Net takes them (``workers.model_loading.with_coords``)."""
    from workers.model_loading import with_coords

    return with_coords(sample) if unet.config.in_channels > unet.config.out_channels else sample


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        # no x0 clipping: DDIM clips x0 but not the epsilon it derives from the (guided) v, so with
        # guidance > 1 clipping pushes samples the opposite way (complementary colours).
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


# ----------------------------------------------------------------------------- data
def make_batch(rng: np.random.Generator, bs: int, size: int = 32, p_uncond: float = 0.1):
    scenes = [sc.random_scene(rng) for _ in range(bs)]
    caps = [sc.caption(s, rng) if rng.random() >= p_uncond else "" for s in scenes]
    imgs = np.stack([sc.render_array(s, size) for s in scenes])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x, caps, scenes


def tokenize(tok, texts: list[str]) -> torch.Tensor:
    return tok(
        texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ----------------------------------------------------------------------------- text pre-training
ATTRIBUTE_CLASSES = {
    "background": sc.COLORS,
    "color": sc.COLORS,
    "shape": sc.SHAPES,
    "size": sc.SIZES,
    "position": sc.POSITIONS,
}


def attribute_labels(scenes: list) -> torch.Tensor:
    """(n, 5) class indices of each scene's attributes, in ATTRIBUTE_CLASSES order."""
    return torch.tensor([[vals.index(getattr(s, a)) for a, vals in ATTRIBUTE_CLASSES.items()] for s in scenes])


def _tail_states(text_encoder, ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final states and a mask of the positions from the first end token on (end token and padding):
    the only positions that have seen the whole caption under CLIP's causal attention."""
    states = text_encoder(ids)[0]
    first_eos = (ids == eos_id).int().argmax(dim=1, keepdim=True)
    pos = torch.arange(ids.shape[1])[None, :]
    return states, (pos >= first_eos)


def pretrain_text_encoder(
    tok, text_encoder, rng: np.random.Generator, steps: int, batch: int = 128, lr: float = 2e-3, log_every: int = 100
) -> dict[str, float]:
    """Teach the text encoder the captions' attributes before the U-Net sees it.

    Trained jointly from scratch, the encoder never separated position words (a word the U-Net does
    not yet use gets no gradient that would separate it, so neither side starts). Here linear heads
    read background, shape colour, shape, size and position from every end/padding state (what
    cross-attention and the U-Net's attention-pooled text embedding mostly read) and the encoder
    learns to make them readable; the heads are thrown away. Returns held-out accuracy per attribute.
    """
    heads = torch.nn.ModuleDict(
        {a: torch.nn.Linear(text_encoder.config.hidden_size, len(v)) for a, v in ATTRIBUTE_CLASSES.items()}
    )
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    eos = tok.eos_token_id

    def loss_and_acc(scenes, caps):
        ids = tokenize(tok, caps)
        states, tail = _tail_states(text_encoder, ids, eos)
        labels = attribute_labels(scenes)
        w = tail.float() / tail.float().sum(1, keepdim=True)
        loss, acc = 0.0, {}
        for j, (a, head) in enumerate(heads.items()):
            logits = head(states)  # (n, L, classes)
            ce = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), labels[:, j : j + 1].expand(-1, ids.shape[1]), reduction="none"
            )
            loss = loss + (ce * w).sum(1).mean()
            pred = logits.argmax(-1)  # every tail position must be right
            acc[a] = float(((pred == labels[:, j : j + 1]) | ~tail).all(1).float().mean())
        return loss, acc

    text_encoder.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        for gp in opt.param_groups:
            gp["lr"] = lr * min(1.0, step / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        scenes = [sc.random_scene(rng) for _ in range(batch)]
        loss, _ = loss_and_acc(scenes, [sc.caption(s, rng) for s in scenes])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0:
            print(
                f"text pre-training step {step}/{steps}  loss {loss.item():.4f}  {time.time() - t0:.0f} s", flush=True
            )
    text_encoder.eval()
    held = np.random.default_rng(10**6)
    scenes = [sc.random_scene(held) for _ in range(2000)]
    with torch.no_grad():
        _, acc = loss_and_acc(scenes, [sc.caption(s, held) for s in scenes])
    print(
        "text pre-training held-out accuracy (2000 captions): " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()),
        flush=True,
    )
    return acc


# ----------------------------------------------------------------------------- saving
def save_pipeline(out: Path, tok, text_encoder, unet, scheduler, extra: dict | None = None) -> None:
    """Write the diffusers-layout directory atomically (tmp dir, then rename)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tok.save_pretrained(tmp / "tokenizer")
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
        "reprise": {
            "pixel_space": True,
            "channels": 3,
            "value_range": [-1, 1],
            "default_size": 32,
            "max_size": 64,
            "default_guidance_scale": 2.0,
            "default_steps": 25,
            **(extra or {}),
        },
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate(
    tok,
    text_encoder,
    unet,
    scheduler,
    prompts: list[str],
    steps: int = 25,
    guidance: float = 4.0,
    size: int = 32,
    seed: int = 0,
) -> torch.Tensor:
    """Standard SD-style loop in pixel space; returns images in [0, 1], shape (n, 3, size, size)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler.config)
    n = len(prompts)
    cond = text_encoder(tokenize(tok, prompts))[0]
    uncond = text_encoder(tokenize(tok, [""] * n))[0]
    emb = torch.cat([uncond, cond])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * sched.init_noise_sigma
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        inp = unet_input(unet, sched.scale_model_input(torch.cat([x, x]), t))
        out = unet(inp, t, encoder_hidden_states=emb).sample
        u, c = out.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def quick_eval(
    tok, text_encoder, unet, scheduler, n: int = 64, seed: int = 999, guidance: float = 4.0, steps: int = 25
):
    from ops.shapes.checker import attribute_accuracy

    rng = np.random.default_rng(seed)
    scenes = [sc.random_scene(rng) for _ in range(n)]
    prompts = [sc.caption(s, rng) for s in scenes]
    imgs = generate(tok, text_encoder, unet, scheduler, prompts, steps=steps, guidance=guidance, seed=seed)
    arr = (imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return attribute_accuracy(list(arr), scenes)


# ----------------------------------------------------------------------------- training
def v_target(x0, noise, ac):
    return ac.sqrt() * noise - (1 - ac).sqrt() * x0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="workers/models/shapes")
    ap.add_argument("--minutes", type=float, default=100.0)
    ap.add_argument("--steps", type=int, default=0, help="total steps (default: estimated from --minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument(
        "--eval-every", type=int, default=0, help="quick checker eval every N steps (0: only at checkpoints)"
    )
    ap.add_argument("--bench", type=int, default=0, help="only time N steps and exit")
    ap.add_argument(
        "--arch", choices=sorted(ARCHS), default="deep-ss", help="U-Net layout (see ARCHS; the shipped model: deep-ss)"
    )
    ap.add_argument(
        "--coords",
        type=int,
        choices=[0, 1],
        default=1,
        help="1: the U-Net also takes x/y coordinate channels (model_index: input_coords)",
    )
    ap.add_argument(
        "--t-high",
        type=float,
        default=0.3,
        help="share of samples with t drawn from [500, 1000) instead of [0, 1000): layout "
        "(position, size) is decided at high noise",
    )
    ap.add_argument(
        "--text-pretrain",
        type=int,
        default=400,
        help="steps of attribute pre-training of the text encoder before the U-Net run (0: none)",
    )
    ap.add_argument(
        "--text-lr",
        type=float,
        default=0.0,
        help="text encoder learning rate in the U-Net run (0, the default: frozen after pre-training)",
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    tok = build_tokenizer()
    text_encoder = build_text_encoder(tok)
    unet = build_unet(text_encoder.config.hidden_size, args.size, ARCHS[args.arch], coords=bool(args.coords))
    scheduler = build_scheduler()
    n_te = sum(p.numel() for p in text_encoder.parameters())
    n_un = sum(p.numel() for p in unet.parameters())
    print(f"vocab {len(tok)}  text_encoder {n_te / 1e6:.2f}M  unet {n_un / 1e6:.2f}M params", flush=True)

    if args.text_pretrain:
        pretrain_text_encoder(tok, text_encoder, rng, args.text_pretrain)
    text_lr = args.lr if args.text_lr is None else args.text_lr
    if text_lr == 0:
        text_encoder.requires_grad_(False).eval()

    models = torch.nn.ModuleDict({"text_encoder": text_encoder, "unet": unet})
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    groups = [{"params": list(unet.parameters()), "scale": 1.0}]
    if text_lr:
        groups.append({"params": list(text_encoder.parameters()), "scale": text_lr / args.lr})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ac_all = scheduler.alphas_cumprod.float()

    t0 = time.time()
    deadline = t0 + args.minutes * 60
    total = args.steps or 10**9  # replaced by an estimate after 30 steps when only --minutes is given
    t_warm = t0
    last_ckpt = t0
    step = 0
    loss_avg = None
    tick = time.time()
    while True:
        if args.steps and step >= args.steps:
            break
        if not args.steps and time.time() >= deadline:
            break
        if step == args.warmup:
            t_warm = time.time()
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            if args.steps:
                prog = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
            else:  # time-based: the CPU is shared, so the step rate is not known in advance
                prog = min(1.0, (time.time() - t_warm) / max(1.0, deadline - t_warm))
            lr = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))
        for gp in opt.param_groups:
            gp["lr"] = lr * gp["scale"]

        x0, caps, _ = make_batch(rng, args.batch, args.size)
        ids = tokenize(tok, caps)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],))
        high = torch.rand(x0.shape[0]) < args.t_high
        t[high] = torch.randint(500, 1000, (int(high.sum()),))
        ac = ac_all[t].view(-1, 1, 1, 1)
        xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        with torch.set_grad_enabled(bool(text_lr)):
            emb = text_encoder(ids)[0]
        pred = unet(unet_input(unet, xt), t, encoder_hidden_states=emb).sample
        loss = torch.nn.functional.mse_loss(pred, v_target(x0, noise, ac))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), models.parameters()):
                pe.lerp_(pm, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()

        if args.bench and step >= args.bench:
            dt = time.time() - t0
            print(f"bench: {step} steps in {dt:.1f}s = {dt / step:.3f} s/step (batch {args.batch})", flush=True)
            return 0
        if step == 30 and not args.steps:
            rate = step / (time.time() - t0)
            total = int(rate * args.minutes * 60)
            print(f"estimated total steps: {total}", flush=True)
        if step % 25 == 0:
            now = time.time()
            print(
                f"step {step}/{total if total < 10**9 else '?'}  loss {loss.item():.4f} (avg {loss_avg:.4f})  lr {lr:.2e}  "
                f"{25 / (now - tick):.2f} it/s  elapsed {(now - t0) / 60:.1f} min",
                flush=True,
            )
            tick = now
        want_eval = args.eval_every and step % args.eval_every == 0
        if time.time() - last_ckpt >= args.ckpt_minutes * 60 or want_eval:
            _checkpoint(args, tok, ema, scheduler, step, t0, evaluate=True)
            last_ckpt = time.time()
            tick = time.time()
    _checkpoint(args, tok, ema, scheduler, step, t0, evaluate=True)
    print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


def _checkpoint(args, tok, ema, scheduler, step, t0, evaluate: bool) -> None:
    te, un = ema["text_encoder"], ema["unet"]
    save_pipeline(
        Path(args.out),
        tok,
        te,
        un,
        scheduler,
        extra={
            "train_steps": step,
            "train_minutes": round((time.time() - t0) / 60, 1),
            "seed": args.seed,
            "arch": args.arch,
            "t_high": args.t_high,
            "lr": args.lr,
            "batch": args.batch,
            "input_coords": bool(args.coords),
            "text_pretrain": args.text_pretrain,
            "text_lr": args.text_lr,
        },
    )
    msg = f"checkpoint step {step} -> {args.out}"
    if evaluate:
        try:
            acc = quick_eval(tok, te, un, scheduler, n=48)
            msg += "  quick eval (48 prompts, ddim 25, cfg 4): " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items())
        except Exception as e:  # pragma: no cover - the eval must never kill training
            msg += f"  (eval failed: {e!r})"
    print(msg, flush=True)


if __name__ == "__main__":
    sys.exit(main())
