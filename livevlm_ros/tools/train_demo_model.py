"""Train the demo model: a small LLaVA-OneVision that narrates and answers questions about the
synthetic robot world (`synthetic_world.py`), from scratch, reproducibly from a seed.

    python -m livevlm_ros.tools.train_demo_model models/demo [--steps 1300] [--seed 0] [--device cuda]

(models/livevlm-demo/README.md has the exact commands of the shipped model.)

The model is the class real checkpoints use (`LlavaOnevisionForConditionalGeneration`: SigLIP,
projector, Qwen2), so the engine runs it exactly as it runs LLaVA-OneVision-7B. Every training
sequence is laid out as the engine lays out an answer: system prompt, the frames' visual tokens
(vision tower -> projector -> 2x2 pooling, 9 per 48x48 frame), the video-end newline, the question
template, then the answer and <|im_end|> (the only tokens with a loss). Narration examples see only
the last two frames, as `engine.describe()` does.

Episodes use seeds from TRAIN_SEEDS; the quality benchmark uses seeds below it, never trained on.
Robustness augmentations (stated, because they matter for bounded memory): frames may be dropped
(labels follow the frames kept), and in frames older than the last two, tokens that show no object
may be dropped at random, with the rest given contiguous positions, which is what any pruned or
retrieved memory looks like to the model. The same model serves every memory policy.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from livevlm_ros.engine.config import DEFAULT_NARRATION_PROMPT, DEFAULT_QUESTION_TEMPLATE, DEFAULT_SYSTEM_PROMPT
from livevlm_ros.engine.models.llava_onevision import visual_tokens
from livevlm_ros.tools import synthetic_world as world
from livevlm_ros.tools.make_tiny_model import build_tokenizer, new_model, save

IMAGE_SIZE = 48            # 6x6 patches of 8 px -> 3x3 tokens after pooling: one token per floor spot
TOKENS_PER_FRAME = 9
CAMERA = (160, 120)        # frames are drawn at camera resolution, then resized as the engine does
FPS = 2.0                  # frames per second the model sees (the demo's sample_fps)
MAX_FRAMES = 128           # longest stream trained on (64 s)
TRAIN_SEEDS = 1_000_000    # training episodes use seeds >= this; benchmarks use seeds below it
MIX = {"where": 0.34, "seen": 0.12, "spot": 0.14, "door": 0.12, "room": 0.08, "narration": 0.2}


def corpus(n_episodes: int = 300) -> list[str]:
    """Every kind of text the model reads or writes, for the tokenizer."""
    rng = np.random.default_rng(0)
    texts = [DEFAULT_SYSTEM_PROMPT, DEFAULT_QUESTION_TEMPLATE.format(question=DEFAULT_NARRATION_PROMPT)]
    for seed in range(n_episodes):
        ep = world.Episode.generate(TRAIN_SEEDS + seed, 60)
        states = [ep.state(k / FPS) for k in range(120)]
        for k in range(1, 120, 7):
            texts.append(world.narration(states[k - 1], states[k]))
            texts += [f"{qa.question} {qa.answer}" for qa in world.questions(states[: k + 1], rng)]
    return texts


class FrameBank:
    """Clean frames at model resolution, cached by (state, pan): the world has few distinct views.
    Lighting and sensor noise are added on the device per frame."""

    PANS = np.linspace(-0.02, 0.02, 5)

    def __init__(self):
        self.cache: dict = {}

    def __call__(self, state: world.State, pan: int) -> np.ndarray:
        key = (state, pan)
        if key not in self.cache:
            img = world.draw(state, *CAMERA, pan=float(self.PANS[pan]))
            self.cache[key] = cv2.resize(img, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
        return self.cache[key]


class Examples(torch.utils.data.IterableDataset):
    """Endless batches of (frames, token-keep masks, question ids, answer ids) from fresh episodes."""

    def __init__(self, tokenizer, batch: int, seed: int, curriculum_steps: int = 0, max_frames: int = MAX_FRAMES,
                 mix: dict = MIX, balance: float | None = None):
        self.tok, self.batch, self.seed, self.curriculum_steps = tokenizer, batch, seed, curriculum_steps
        self.longest, self.mix, self.balance = max_frames, mix, balance
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def max_frames(self, step: int) -> int:
        """Curriculum: streams grow from 16 frames to the longest over the first `curriculum_steps`
        (short streams first: retrieval is learnt faster where there is less to search)."""
        if step >= self.curriculum_steps:
            return self.longest
        return 16 + (self.longest - 16) * step // self.curriculum_steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, worker])
        bank = FrameBank()
        for k in range(2**62):
            # the loader takes batches from its workers in turn, so this is the batch's training step
            yield self._batch(rng, bank, self.max_frames(k * workers + worker))

    def _batch(self, rng, bank, max_frames=MAX_FRAMES):
        frames, keeps, questions, answers, kinds = [], [], [], [], []
        for _ in range(self.batch):
            f, keep, q, a, kind = self.example(rng, bank, max_frames)
            frames += f
            keeps.append(keep)
            questions.append(q)
            answers.append(a)
            kinds.append(kind)
        return dict(pixels=torch.from_numpy(np.stack(frames)), keeps=keeps, questions=questions,
                    answers=answers, kinds=kinds)

    def example(self, rng, bank, max_frames=MAX_FRAMES):
        n = max(1, int(max_frames * math.sqrt(rng.random())))           # favour long streams
        ep = world.Episode.generate(int(TRAIN_SEEDS + rng.integers(0, 2**40)), n / FPS + 1)
        offset = rng.uniform(0, 1 / FPS)
        times = offset + np.arange(n) / FPS
        if rng.random() < 0.3 and n > 3:                       # frame dropout (the last two stay)
            kept = rng.random(n - 2) > rng.uniform(0, 0.5)
            times = np.concatenate([times[:-2][kept], times[-2:]])
        states = [ep.state(t) for t in times]
        kind = str(rng.choice(list(self.mix), p=list(self.mix.values())))
        if kind == "narration":
            states = states[-2:]
            question = DEFAULT_NARRATION_PROMPT
            answer = world.narration(states[-2] if len(states) == 2 else None, states[-1])
        else:
            name = spot = None
            if self.balance is not None:
                # Drawn uniformly, ~75% of spot questions are answered "nothing" and the model learns
                # that prior instead of looking: ask about an occupied spot / an object the stream
                # showed with probability `balance`, else about an empty spot / an object it did not.
                # "Seen" questions drawn uniformly are mostly "was seen" on long streams; asked this way,
                # a model that does not look gets `balance` or 1 - `balance` of them right, not more.
                shown = sorted({o for s in states for _, o in s.spots})
                occupied = [sp for sp, _ in states[-1].spots]
                yes = rng.random() < self.balance
                if kind in ("where", "seen"):
                    pool = shown if yes else [o for o in world.OBJECTS if o not in shown]
                    name = str(rng.choice(pool)) if pool else None
                if kind == "spot":
                    pool = occupied if yes else [sp for sp in world.SPOTS if sp not in occupied]
                    spot = str(rng.choice(pool)) if pool else None
            qa = next(qa for qa in world.questions(states, rng, name, spot) if qa.kind == kind)
            question, answer = qa.question, qa.answer
            if kind in ("where", "seen", "spot") and not answer.endswith(("not seen.", "nothing.")):
                kind += "+"                  # logged apart: the answers that need an object recognised
        keep = np.ones((len(states), TOKENS_PER_FRAME), bool)
        if kind != "narration" and len(states) > 2 and rng.random() < 0.5:     # token dropout, old frames
            keep[:-2] = rng.random((len(states) - 2, TOKENS_PER_FRAME)) < rng.uniform(0.05, 0.7)
            for i, s in enumerate(states[:-2]):
                for spot, _ in s.spots:
                    keep[i, 6 + world.SPOTS.index(spot)] = True                # the floor row shows objects
        frames = [bank(s, int(rng.integers(0, len(FrameBank.PANS)))) for s in states]
        q_ids = self.tok(DEFAULT_QUESTION_TEMPLATE.format(question=question), add_special_tokens=False)["input_ids"]
        a_ids = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.im_end]
        return frames, keep, q_ids, a_ids, kind


# ---- the model side: the engine's sequence layout, with gradients ------------------------------------
def normalise(pixels_uint8: torch.Tensor, dtype, augment: bool, generator=None) -> torch.Tensor:
    x = pixels_uint8.permute(0, 3, 1, 2).float()
    if augment:
        n = x.shape[0]
        light = torch.empty(n, 1, 1, 1, device=x.device).uniform_(0.88, 1.12, generator=generator)
        x = (x * light + torch.randn(x.shape, device=x.device, generator=generator) * 2.5).clamp(0, 255)
    return ((x / 255.0 - 0.5) / 0.5).to(dtype)


def sequences(model, prefix_ids, batch, dtype, augment=True, generator=None):
    """Input embeddings [B, T, hidden] and targets [B, T] (-100 where no loss) for a batch."""
    device = model.lm_head.weight.device
    embed = model.model.language_model.embed_tokens
    vis = visual_tokens(model, normalise(batch["pixels"].to(device), dtype, augment, generator))
    prefix = embed(torch.tensor(prefix_ids, device=device))
    newline = model.model.image_newline.to(dtype)[None]
    seqs, targets, offset = [], [], 0
    for keep, q, a in zip(batch["keeps"], batch["questions"], batch["answers"]):
        n = len(keep)
        frames = vis[offset:offset + n][torch.as_tensor(keep, device=device)]
        offset += n
        text = embed(torch.tensor(q + a, device=device))
        seqs.append(torch.cat([prefix, frames, newline, text]))
        t = torch.full((seqs[-1].shape[0],), -100, dtype=torch.long)
        t[-len(a):] = torch.tensor(a)
        targets.append(t)
    length = max(s.shape[0] for s in seqs)
    # right padding: with causal attention no real token attends to the padding after it
    x = torch.stack([torch.nn.functional.pad(s, (0, 0, 0, length - s.shape[0])) for s in seqs])
    y = torch.stack([torch.nn.functional.pad(t, (0, length - t.shape[0]), value=-100) for t in targets])
    return x, y.to(device)


def forward_loss(model, x, y):
    hidden = model.model.language_model(inputs_embeds=x, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden[:, :-1]).float()
    target = y[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100)
    mask = target != -100
    right = (logits.argmax(-1) == target) | ~mask
    return loss, right.all(dim=1)              # per example: every answer token right (teacher forced)


def train(out: Path, steps: int, seed: int, device: str, batch: int, lr: float, workers: int,
          max_minutes: float, size: dict, stop_after: int | None = None, curriculum: float = 0.6,
          train_vision: bool = False, init: Path | None = None, max_frames: int = MAX_FRAMES,
          mix: dict = MIX, balance: float | None = None, embed_rms: float | None = None) -> dict:
    torch.manual_seed(seed)
    if init is None:
        tokenizer = build_tokenizer(corpus(), vocab_size=800)
        model = new_model(tokenizer, image_size=IMAGE_SIZE, **size).to(device)
        model.model.image_newline.data.normal_(0, 0.02)
        # The tower stays random and frozen (below). SigLIP initialises its position embeddings at
        # RMS 1/sqrt(width), ~1/10 of a patch's content: which column a floor token sits in was then
        # 0.4% of its variance on these frames, little for attention to find "the left one" by. At
        # RMS 1 it is ~50% (and the object's share grows too, 8% -> 12%).
        model.model.vision_tower.embeddings.position_embedding.weight.data.normal_(0, 1.0)
    else:                                           # a further stage, from a saved model
        from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration
        tokenizer = AutoTokenizer.from_pretrained(str(init))
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(init), dtype=torch.float32).to(device)
    # Qwen2 initialises token embeddings at RMS 0.02 per dimension, while visual tokens enter at RMS ~1,
    # and the first layer's output added to a text token is ~50x its embedding. In the first demo model
    # the answer's hidden state differed by <1% whichever object or spot the question named; it only
    # learnt answers that ignore those words (room, door, "nothing"). So text embeddings start at RMS
    # `embed_rms` (rescaled from a saved model only when it is given) and are not weight-decayed.
    # (Rescaling alone did not fix that model in a short fine-tune; a new model trained with this and
    # the other changes named here did learn the objects. See models/livevlm-demo/README.md.)
    embed = model.model.language_model.embed_tokens.weight
    if embed_rms is None and init is None:
        embed_rms = 1.0
    if embed_rms is not None:
        with torch.no_grad():
            embed.mul_(embed_rms / embed.pow(2).mean().sqrt())
    if not train_vision:
        # Trained from scratch on this little world, the tower collapsed onto the room colour (objects
        # and doors vanished from its features); a random tower keeps them, the projector learns to read it.
        model.model.vision_tower.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    prefix_ids = tokenizer(DEFAULT_SYSTEM_PROMPT, add_special_tokens=False)["input_ids"]
    examples = Examples(tokenizer, batch, seed, int(curriculum * steps), max_frames, mix, balance)
    data = torch.utils.data.DataLoader(examples, batch_size=None, num_workers=workers,
                                       pin_memory=device.startswith("cuda"), persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers else None)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and p is not embed]
    other = [p for p in model.parameters() if p.requires_grad and (p.ndim < 2 or p is embed)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.05), dict(params=other, weight_decay=0.0)],
                            lr=lr, betas=(0.9, 0.95))
    warmup = min(300, steps // 10) if init is None else min(50, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    gen = torch.Generator(device=device).manual_seed(seed)
    log, t0, window, waited = [], time.time(), {}, 0.0
    model.train()
    step, t_ready = 0, time.time()
    for step, b in enumerate(data, start=1):
        waited += time.time() - t_ready            # time the GPU waited for data
        with autocast:
            x, y = sequences(model, prefix_ids, b, torch.float32, generator=gen)
            loss, exact = forward_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        for kind, ok in zip(b["kinds"], exact.tolist()):
            window.setdefault(kind, []).append(ok)
        stop = step >= (stop_after or steps) or (time.time() - t0) / 60 > max_minutes
        if step % 100 == 0 or stop:
            row = dict(step=step, loss=round(loss.item(), 4), minutes=round((time.time() - t0) / 60, 2),
                       data_wait_s=round(waited, 1), tokens=x.shape[1], lr=round(sched.get_last_lr()[0], 6),
                       **{k: round(float(np.mean(v)), 3) for k, v in sorted(window.items())})
            log.append(row)
            print(json.dumps(row), flush=True)
            window, waited = {}, 0.0
        if stop:
            break
        t_ready = time.time()
    model.eval()
    save(model.half(), tokenizer, out)
    previous = json.loads((init / "training_log.json").read_text()) if init and (init / "training_log.json").exists() else None
    report = dict(steps_done=step, steps_planned=steps, curriculum=curriculum, train_vision=train_vision, seed=seed,
                  init=str(init) if init else None, previous_stage=previous, max_frames=max_frames, mix=mix,
                  balance=balance, embed_rms=embed_rms, batch=batch, lr=lr, params=params,
                  size=size, minutes=round((time.time() - t0) / 60, 2), device=torch.cuda.get_device_name()
                  if device.startswith("cuda") else "cpu", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  torch=torch.__version__, log=log)
    (out / "training_log.json").write_text(json.dumps(report, indent=1))
    return report


SIZES = {  # LM layers / hidden / heads, vision width / layers
    "demo": dict(layers=6, hidden=256, heads=8, kv_heads=4, vision_hidden=128, vision_layers=3),
    "smoke": dict(layers=2, hidden=64, heads=4, kv_heads=2, vision_hidden=32, vision_layers=1),
}


def parse_mix(text: str) -> dict:
    mix = {k: float(v) for k, v in (item.split("=") for item in text.split(","))}
    unknown = set(mix) - set(MIX)
    if unknown:
        raise SystemExit(f"unknown question kinds {sorted(unknown)}; known: {sorted(MIX)}")
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-minutes", type=float, default=float("inf"), help="stop early and save (logged)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (reproduces a "
                    "--max-minutes run: same --steps, its steps_done)")
    ap.add_argument("--curriculum", type=float, default=0.6, help="share of --steps over which streams grow")
    ap.add_argument("--train-vision", action="store_true", help="train the SigLIP tower too (default: random, frozen)")
    ap.add_argument("--init", type=Path, default=None, help="continue from a saved model (a further stage)")
    ap.add_argument("--max-frames", type=int, default=MAX_FRAMES, help="longest training stream")
    ap.add_argument("--mix", default=None, help="question mix, e.g. where=0.5,seen=0.2,narration=0.3")
    ap.add_argument("--size", choices=sorted(SIZES), default="demo")
    ap.add_argument("--embed-rms", type=float, default=None, help="rescale the text embeddings to this RMS per "
                    "dimension before training (default: 1.0 for a new model, unchanged with --init)")
    ap.add_argument("--balance", type=float, default=None, help="share of spot / where / seen questions asked "
                    "about an occupied spot / an object the stream showed; the rest ask about an empty spot / "
                    "an object it did not show (default: uniform draws)")
    args = ap.parse_args()
    report = train(args.out, args.steps, args.seed, args.device, args.batch, args.lr, args.workers,
                   args.max_minutes, SIZES[args.size], args.stop_after, args.curriculum, args.train_vision,
                   args.init, args.max_frames, parse_mix(args.mix) if args.mix else MIX, args.balance,
                   args.embed_rms)
    print(json.dumps({k: v for k, v in report.items() if k != "log"}))


if __name__ == "__main__":
    main()
