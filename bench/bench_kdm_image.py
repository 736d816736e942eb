"""Image KDM training-step and sampling benchmark: the official fp32 eager step vs the training engine.

    python bench/bench_kdm_image.py --steps 20 --warmup 5 --compile --out bench-kdm-image.json   # one GPU
    python bench/bench_kdm_image.py --device cpu --tiny --steps 2 --warmup 1 --out smoke.json     # smoke test

With --compile the warm-up includes compiling the three U-Nets (forward and backward), several
minutes for cifar10-uncond; ``warmup_s`` in the JSON records it.

Measures, on random data of the right shapes (x_T = 80 * eps, x_0 uniform in [-1, 1]) and distance
'pseudo-huber' (LPIPS needs VGG16 weights that are not assumed here):
  (a) ``reference_step``: the official semantics, eager fp32, no TF32, no channels_last, plain
      (for-loop) Adam, per-parameter EMA loop, decoder run twice, discriminator step first;
  (b) the engine step (``pipeline.training.image_train.ImageTrainer``): bf16 autocast, TF32, channels_last, fused
      Adam, multi-tensor EMA, one decoder pass; also in fp32 (+TF32) and, with --compile, compiled;
  peak GPU memory of each, speedup (a)/(b), and one-step sampling images/s at batch --sample-batch
  (bf16 and fp32). Prints the GPU name and the date; writes everything as JSON to --out.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.discriminator import Discriminator, discriminator_loss, generator_adversarial_loss  # noqa: E402
from models.distances import make_distance  # noqa: E402
from models.kdm_image import KDMImage  # noqa: E402
from models.songunet import use_box_resampling, use_float32_bias, use_fused_attention  # noqa: E402
from pipeline.devices import resolve_device
from timing import kernel_breakdown, reset_memory, time_steps  # noqa: E402
from pipeline.training.image_train import ImageTrainer, set_tf32  # noqa: E402
from storage_schemas.kdm_image import ImageTrainConfig, KDMImageConfig, SongUNetConfig, image_preset  # noqa: E402

TINY_UNET = SongUNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,))


# -- the official step, as a reference ------------------------------------------------------------

class ReferenceState:
    """Model, EMA, discriminator and plain Adam optimizers of the official trainer (fp32, eager)."""

    def __init__(self, model_cfg: KDMImageConfig, train_cfg: ImageTrainConfig, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        # EDM's grouped resampling convolutions, as the official code (the engine pools instead).
        self.model = use_box_resampling(KDMImage.from_config(model_cfg), False).to(device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.disc = Discriminator(model_cfg.channels).to(device).train()
        kw = dict(betas=tuple(train_cfg.betas), eps=train_cfg.adam_eps, foreach=False, fused=False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=train_cfg.lr, **kw)
        self.d_opt = torch.optim.Adam(self.disc.parameters(), lr=train_cfg.disc_lr, **kw)
        self.distance = make_distance(model_cfg.distance, model_cfg.pseudo_huber_c)
        self.adv_weight, self.ema_decay = model_cfg.adv_weight, train_cfg.ema_decay


def reference_step(st: ReferenceState, x0: torch.Tensor, xT: torch.Tensor, labels=None) -> dict[str, float | torch.Tensor]:
    """One iteration in the official order (notes Sec. 4.4): G forward, D step, G loss with the updated D,
    nan_to_num of the generator gradients, G step, EMA ema <- d * ema + (1 - d) * theta per parameter."""
    st.opt.zero_grad()
    out = st.model(x0, xT, labels, fuse_decoder=False)      # decoder runs twice (z0_noisy, push)
    rec = st.distance(out.x0_rec, x0).mean()
    pred = st.distance(out.x0_push, x0).mean()
    lat = F.mse_loss(out.z_push, out.z0)
    st.d_opt.zero_grad()
    d_loss = discriminator_loss(st.disc(x0), st.disc(out.x0_push.detach()))
    d_loss.backward()
    st.d_opt.step()
    adv = generator_adversarial_loss(st.disc(out.x0_push))   # stray D gradients, zeroed next step
    total = rec + lat + pred + st.adv_weight * adv
    total.backward()
    for p in st.model.parameters():
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
    st.opt.step()
    with torch.no_grad():
        for e, p in zip(st.ema.parameters(), st.model.parameters()):
            e.mul_(st.ema_decay).add_(p, alpha=1 - st.ema_decay)
    return {"total": total.detach(), "disc": d_loss.detach()}


def bench_reference(model_cfg, train_cfg, device, data, args) -> dict:
    reset_memory(device)
    if device.type == "cuda":
        set_tf32(False)
        torch.backends.cudnn.benchmark = False      # the official trainer's defaults
    st = ReferenceState(model_cfg, train_cfg, device)
    x0, xT = data
    res = time_steps(lambda: reference_step(st, x0, xT), device, args.warmup, args.steps)
    res["final_loss"] = float(reference_step(st, x0, xT)["total"])
    del st
    return res


def bench_engine(model_cfg, train_cfg, device, data, args, fused_attention: bool = False, **changes) -> dict:
    reset_memory(device)
    tc = train_cfg.model_copy(update={"cuda_graphs": False, **changes})      # eager unless a variant asks
    trainer = ImageTrainer(model_cfg, tc, device)
    if fused_attention:
        use_fused_attention(trainer.model)
    x0, xT = data
    res = time_steps(lambda: trainer.train_step(xT, x0), device, args.warmup, args.steps)
    if args.profile:
        res["profile"] = kernel_breakdown(lambda: trainer.train_step(xT, x0), device, calls=3)
    res["final_loss"] = trainer.pop_metrics().get("total")
    res["nonfinite_steps"] = trainer.nonfinite_steps
    res["settings"] = {k: getattr(tc, k) for k in ("precision", "tf32", "channels_last", "compile",
                                                   "cuda_graphs")}
    del trainer
    return res


@dataclass(frozen=True)
class Sampling:
    """One sampling variant: autocast precision (fp32 = none), torch's fused attention, torch.compile mode
    (None = eager), channels_last (low precision only) and the conv bias added in float32
    (models.songunet.use_float32_bias)."""
    precision: str = "fp32"
    fused_attention: bool = False
    compile_mode: Optional[str] = None
    channels_last: bool = True
    float32_bias: bool = False


SAMPLING_VARIANTS = {
    "fp32": Sampling(), "bf16": Sampling("bf16"), "bf16-sdpa": Sampling("bf16", True),
    "bf16-sdpa-nchw": Sampling("bf16", True, channels_last=False),
    "bf16-sdpa-compile": Sampling("bf16", True, "default"),
    "bf16-sdpa-compile-max": Sampling("bf16", True, "max-autotune"),
    "fp16-sdpa-compile": Sampling("fp16", True, "default"),
    "bf16-sdpa-graphs": Sampling("bf16", True, "reduce-overhead"),
    "fp16-sdpa-graphs": Sampling("fp16", True, "reduce-overhead"),
    "fp16-sdpa-compile-max": Sampling("fp16", True, "max-autotune"),
    "bf16-sdpa-compile-nchw": Sampling("bf16", True, "default", channels_last=False),
    "bf16-sdpa-compile-f32bias": Sampling("bf16", True, "default", float32_bias=True),
}


@torch.no_grad()
def bench_sampling(model_cfg, device, batch: int, v: Sampling, args) -> dict:
    """One-step sampling (encoder of x_T, Koopman push, decoder) of variant ``v``, images/s at ``batch``."""
    reset_memory(device)
    if device.type == "cuda":
        set_tf32(False)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    model = KDMImage.from_config(model_cfg).to(device).eval()
    use_fused_attention(model, v.fused_attention)
    use_float32_bias(model, v.float32_bias)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(v.precision)
    xT = model.sample_noise(batch, device=device)
    if low is not None and v.channels_last:
        model = model.to(memory_format=torch.channels_last)
        xT = xT.contiguous(memory_format=torch.channels_last)
    if v.compile_mode:
        # Static shapes, fresh caches: a second batch size would otherwise recompile with a dynamic batch.
        torch._dynamo.reset()
        gen = torch.compile(model.generate, mode=v.compile_mode, dynamic=False)
    else:
        gen = model.generate

    def run():
        if low is None:
            return gen(xT)
        with torch.autocast(device.type, dtype=low):
            return gen(xT)

    reps = max(1, args.steps // 2)
    res = time_steps(run, device, max(1, args.warmup // 2), reps)
    if args.profile:
        res["profile"] = kernel_breakdown(run, device, calls=3)
    res["images_per_s"] = batch / res["step_s"]
    res["batch"] = batch
    res["settings"] = {**asdict(v), "cudnn_benchmark": bool(args.cudnn_benchmark)}
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="cifar10-uncond")
    ap.add_argument("--tiny", action="store_true", help="a tiny U-Net (smoke test, e.g. on the CPU)")
    ap.add_argument("--batch", type=int, default=None, help="default 128 (4 with --tiny)")
    ap.add_argument("--sample-batch", default=None,
                    help="one or more comma-separated batch sizes for sampling; default 1000 (8 with --tiny)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="sampling: let cuDNN time its convolution algorithms (fixed shapes; the engine always does)")
    ap.add_argument("--profile", action="store_true",
                    help="also record each variant's GPU time by kernel class (torch.profiler)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time the engine with torch.compile")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--variants", default="fp32,bf16,nchw",
                    help="engine variants besides the reference: any of fp32, bf16, nchw, graphs, graphs-nchw, "
                         "graphs-sdpa (whole-step CUDA graph) (--compile adds compile)")
    ap.add_argument("--sampling", default="bf16,fp32",
                    help=f"one-step sampling variants, any of {', '.join(SAMPLING_VARIANTS)}")
    ap.add_argument("--fused-attention", action="store_true",
                    help="engine variants with torch's fused attention (models.songunet.use_fused_attention)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    unknown = {v.strip() for v in args.sampling.split(",") if v.strip()} - set(SAMPLING_VARIANTS)
    if unknown:
        ap.error(f"unknown sampling variants {sorted(unknown)}; valid: {', '.join(SAMPLING_VARIANTS)}")

    device = resolve_device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    model_cfg = image_preset(args.preset).model_copy(update={"distance": "pseudo-huber"})
    if args.tiny:
        model_cfg = KDMImageConfig.model_validate({**model_cfg.model_dump(), "unet": TINY_UNET.model_dump(),
                                                   "latent_proj_dim": None, "img_resolution": 32})
    batch = args.batch or (4 if args.tiny else 128)
    sample_batches = [int(b) for b in str(args.sample_batch or (8 if args.tiny else 1000)).split(",")]
    train_cfg = ImageTrainConfig(device="cuda" if device.type == "cuda" else "cpu", batch_size=batch)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "gpu": gpu,
            "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "preset": args.preset, "tiny": args.tiny, "batch": batch, "distance": "pseudo-huber",
            "trainable_parameters": sum(p.numel() for p in KDMImage.from_config(model_cfg).parameters())}
    print(f"# {info['date']}  device {device} ({gpu or platform.processor() or 'cpu'})  torch {torch.__version__}  "
          f"preset {args.preset}{' (tiny)' if args.tiny else ''}  batch {batch}", flush=True)

    g = torch.Generator(device="cpu").manual_seed(0)
    R, C = model_cfg.img_resolution, model_cfg.channels
    xT = (model_cfg.noise_scale * torch.randn(batch, C, R, R, generator=g)).to(device)
    x0 = (torch.rand(batch, C, R, R, generator=g) * 2 - 1).to(device)
    data = (x0, xT)

    results: dict = {"info": info, "train_step": {}, "sampling": {}}

    def record(name, fn):
        try:
            r = fn()
        except Exception as e:   # keep the other measurements
            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=3)}
        results["train_step"][name] = r
        if "error" in r:
            print(f"{name:28s} failed: {r['error']}", flush=True)
        else:
            mem = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "-"
            print(f"{name:28s} {1e3 * r['step_s']:9.1f} ms/step  peak {mem:>10s}  warmup {r['warmup_s']:.1f} s",
                  flush=True)
            prof = r.get("profile")
            if prof:
                print(f"{'':28s} GPU {prof['gpu_ms_per_call']:.1f} ms/step, {prof['launches_per_call']} launches: "
                      + ", ".join(f"{k} {ms:.1f}" for k, ms in prof["ms_by_class"].items()), flush=True)

    if not args.skip_reference:
        record("reference_fp32_eager", lambda: bench_reference(model_cfg, train_cfg, device, data, args))
    variants = {v.strip() for v in args.variants.split(",") if v.strip()}
    if "fp32" in variants:
        record("engine_fp32_tf32", lambda: bench_engine(model_cfg, train_cfg, device, data, args, precision="fp32"))
    if "bf16" in variants:
        record("engine_bf16", lambda: bench_engine(model_cfg, train_cfg, device, data, args))
    if "nchw" in variants:
        record("engine_bf16_nchw", lambda: bench_engine(model_cfg, train_cfg, device, data, args,
                                                        channels_last=False))
    if "graphs" in variants:
        record("engine_bf16_cuda_graphs", lambda: bench_engine(model_cfg, train_cfg, device, data, args,
                                                               cuda_graphs=True))
    if "graphs-nchw" in variants:
        record("engine_bf16_nchw_cuda_graphs", lambda: bench_engine(model_cfg, train_cfg, device, data, args,
                                                                    cuda_graphs=True, channels_last=False))
    if "graphs-sdpa" in variants:
        record("engine_bf16_cuda_graphs_sdpa", lambda: bench_engine(model_cfg, train_cfg, device, data, args,
                                                                    fused_attention=True, cuda_graphs=True))
    if args.fused_attention:
        record("engine_fp32_tf32_sdpa", lambda: bench_engine(model_cfg, train_cfg, device, data, args,
                                                             fused_attention=True, precision="fp32"))
        record("engine_bf16_sdpa", lambda: bench_engine(model_cfg, train_cfg, device, data, args,
                                                        fused_attention=True))
    if args.compile:
        record("engine_bf16_compile", lambda: bench_engine(model_cfg, train_cfg, device, data, args, compile=True))

    ref = results["train_step"].get("reference_fp32_eager", {})
    speedups = {}
    for name, r in results["train_step"].items():
        if name != "reference_fp32_eager" and "step_s" in r and "step_s" in ref:
            speedups[name] = ref["step_s"] / r["step_s"]
    results["speedup_vs_reference"] = speedups
    for name, s in speedups.items():
        print(f"speedup {name:20s} {s:6.2f}x", flush=True)

    for name in [v.strip() for v in args.sampling.split(",") if v.strip()]:
        for sample_batch in sample_batches:
            key = name if len(sample_batches) == 1 else f"{name}@{sample_batch}"
            try:
                r = bench_sampling(model_cfg, device, sample_batch, SAMPLING_VARIANTS[name], args)
                prof = r.get("profile") or {}
                extra = (f"; {prof['gpu_ms_per_call']:.1f} GPU ms, " + ", ".join(
                    f"{k} {ms:.1f}" for k, ms in prof["ms_by_class"].items())) if prof else ""
                print(f"sampling {name:22s} batch {sample_batch}: {r['images_per_s']:,.0f} images/s "
                      f"(warm-up {r['warmup_s']:.1f} s){extra}", flush=True)
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {e}"}
                print(f"sampling {name} failed: {r['error']}", flush=True)
            results["sampling"][key] = r

    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
