"""Image KDM training-step and sampling benchmark: the official fp32 eager step vs the training engine.

    python bench/bench_kdm_image.py --steps 20 --warmup 5 --compile --out bench-kdm-image.json   # one GPU
    python bench/bench_kdm_image.py --device cpu --tiny --steps 2 --warmup 1 --out smoke.json     # smoke test

With --compile the warm-up includes compiling the three U-Nets (forward and backward), several
minutes for cifar10-uncond; ``warmup_s`` in the JSON records it.

    python bench/bench_kdm_image.py --objectives pseudo-huber,pseudo-huber+D,lpips-own,lpips-own+D \
        --variants graphs-nchw,graphs@lpips-own --profile --sampling none --out engine.json   # the presets' objectives
    python bench/bench_kdm_image.py --student mini --objectives lpips-own --variants graphs-nchw --skip-reference \
        --sampling none --out mini.json                 # the mini preset's student at its batch (256)

Measures, on random data of the right shapes (x_T = 80 * eps, x_0 uniform in [-1, 1]), for each training
objective of --objectives (distance 'pseudo-huber' or 'lpips-own', '+D' with the discriminator and its
adversarial term at the preset's weight; 'lpips' needs VGG16 weights that are not assumed here; 'lpips-own'
runs on the pipeline's perceptual network with random weights: the step's cost does not depend on them):
  (a) ``reference_step`` (objective pseudo-huber+D): the official semantics, eager fp32, no TF32 (the
      official code leaves TF32 on: ``bench/speed_vs_official.py`` times the official code itself), no
      channels_last, plain (for-loop) Adam, per-parameter EMA loop, decoder run twice, discriminator step first;
  (b) the engine step (``pipeline.training.image_train.ImageTrainer``): bf16 autocast, TF32, channels_last, fused
      Adam, multi-tensor EMA, one decoder pass; also in fp32 (+TF32), NCHW, as a whole-step CUDA graph and,
      with --compile, compiled (--variants; ``NAME@OBJECTIVE`` runs a variant for that objective only);
  peak GPU memory of each, speedup (a)/(b), with --profile the GPU time by kernel class, kernels per step
  and the idle GPU time per step (wall time per step minus GPU busy time), and one-step sampling images/s
  at batch --sample-batch (bf16 and fp32). ``--student mini`` times the mini preset's student (64 channels,
  1 block, batch 256) instead of the full preset's U-Nets. Prints the GPU name and the date; writes
  everything as JSON to --out. Results of objective pseudo-huber+D keep the variant's name
  (``engine_bf16``); the others are named ``<variant>@<objective>``.
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


def random_perceptual_net(device: torch.device):
    """The 'lpips-own' distance on the perceptual network of the default recipe, random weights (seed 0)."""
    from models.perceptual import OwnLPIPS, PerceptualConvNet
    from storage_schemas.perceptual import PerceptualNetTrainConfig
    torch.manual_seed(0)
    return OwnLPIPS(PerceptualConvNet(PerceptualNetTrainConfig().width)).to(device)


def bench_engine(model_cfg, train_cfg, device, data, args, fused_attention: bool = False, **changes) -> dict:
    reset_memory(device)
    tc = train_cfg.model_copy(update={"cuda_graphs": False, **changes})      # eager unless a variant asks
    own = random_perceptual_net(device) if model_cfg.distance == "lpips-own" else None
    trainer = ImageTrainer(model_cfg, tc, device, perceptual=own)
    if fused_attention:
        use_fused_attention(trainer.model)
    x0, xT = data
    res = time_steps(lambda: trainer.train_step(xT, x0), device, args.warmup, args.steps)
    if args.profile:
        res["profile"] = prof = kernel_breakdown(lambda: trainer.train_step(xT, x0), device, calls=3)
        if prof:   # the GPU idles while the host prepares or launches work: wall time minus busy time
            prof["gpu_idle_ms_per_step"] = max(0.0, 1e3 * res["step_s"] - prof["gpu_ms_per_call"])
    res["final_loss"] = trainer.pop_metrics().get("total")
    res["nonfinite_steps"] = trainer.nonfinite_steps
    res["settings"] = {k: getattr(tc, k) for k in ("precision", "tf32", "channels_last", "compile",
                                                   "cuda_graphs", "batch_size")}
    res["settings"].update(distance=model_cfg.distance, adv_weight=model_cfg.adv_weight)
    res["pairs_per_s"] = tc.batch_size / res["step_s"]
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


OBJECTIVES = ("pseudo-huber", "pseudo-huber+D", "lpips-own", "lpips-own+D")
DEFAULT_OBJECTIVE = "pseudo-huber+D"          # results keep the bare variant names (earlier JSON files)
ENGINE_VARIANTS = {   # name -> (result name, engine settings)
    "fp32": ("engine_fp32_tf32", dict(precision="fp32", channels_last=True)),
    "bf16": ("engine_bf16", dict(channels_last=True)),
    "nchw": ("engine_bf16_nchw", dict(channels_last=False)),
    "fp32-nchw": ("engine_fp32_tf32_nchw", dict(precision="fp32", channels_last=False)),
    "graphs": ("engine_bf16_cuda_graphs", dict(cuda_graphs=True, channels_last=True)),
    "graphs-nchw": ("engine_bf16_nchw_cuda_graphs", dict(cuda_graphs=True, channels_last=False)),
    "graphs-sdpa": ("engine_bf16_cuda_graphs_sdpa", dict(fused_attention=True, cuda_graphs=True, channels_last=True)),
    # torch.compile of the U-Nets inside the whole-step graph: inductor's fused normalisation kernels take
    # either layout, so channels_last can drop cuDNN's transposes without PyTorch GroupNorm's copies
    "graphs-compile-nchw": ("engine_bf16_nchw_cuda_graphs_compile", dict(cuda_graphs=True, compile=True,
                                                                         channels_last=False)),
    "graphs-compile": ("engine_bf16_cuda_graphs_compile", dict(cuda_graphs=True, compile=True, channels_last=True)),
}


def objective_config(base: KDMImageConfig, objective: str, adv_weight: float) -> KDMImageConfig:
    """``base`` with the objective's distance, and the discriminator at ``adv_weight`` ('+D') or off."""
    distance, _, d = objective.partition("+")
    return KDMImageConfig.model_validate({**base.model_dump(), "distance": distance,
                                          "adv_weight": adv_weight if d == "D" else 0.0,
                                          "adv_start": 0.0, "adv_rampup": 0.0})


def parse_variants(text: str, objectives: list[str], ap) -> list[tuple[str, str]]:
    """'graphs-nchw,graphs@lpips-own' -> [(variant, objective), ...] in the order given."""
    runs = []
    for token in (t.strip() for t in text.split(",")):
        if not token or token == "none":
            continue
        name, _, only = token.partition("@")
        if name not in ENGINE_VARIANTS:
            ap.error(f"unknown engine variant {name!r}; valid: {', '.join(ENGINE_VARIANTS)} (NAME@OBJECTIVE for one "
                     f"objective)")
        if only and only not in OBJECTIVES:
            ap.error(f"unknown objective {only!r} in {token!r}; valid: {', '.join(OBJECTIVES)}")
        runs += [(name, o) for o in ([only] if only else objectives) if (name, o) not in runs]
    return runs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="cifar10-uncond")
    ap.add_argument("--student", choices=("preset", "mini"), default="preset",
                    help="preset: the --preset U-Nets (default); mini: the mini distill preset's student "
                         "(64 channels, 1 block) and batch")
    ap.add_argument("--tiny", action="store_true", help="a tiny U-Net (smoke test, e.g. on the CPU)")
    ap.add_argument("--batch", type=int, default=None, help="default 128, the mini student's 256 with --student "
                                                            "mini (4 with --tiny)")
    ap.add_argument("--objectives", default=DEFAULT_OBJECTIVE,
                    help=f"comma-separated training objectives of the engine variants: {', '.join(OBJECTIVES)}")
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
                    help="engine variants besides the reference: any of fp32, bf16, nchw, fp32-nchw, graphs, graphs-nchw, "
                         "graphs-sdpa (whole-step CUDA graph), each for every objective or as NAME@OBJECTIVE for "
                         "one (--compile adds compile); none for no engine variant")
    ap.add_argument("--sampling", default="bf16,fp32",
                    help=f"one-step sampling variants, any of {', '.join(SAMPLING_VARIANTS)}; none for none")
    ap.add_argument("--fused-attention", action="store_true",
                    help="engine variants with torch's fused attention (models.songunet.use_fused_attention)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    sampling = [v.strip() for v in args.sampling.split(",") if v.strip() and v.strip() != "none"]
    unknown = set(sampling) - set(SAMPLING_VARIANTS)
    if unknown:
        ap.error(f"unknown sampling variants {sorted(unknown)}; valid: {', '.join(SAMPLING_VARIANTS)}")
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        ap.error(f"unknown objectives {bad}; valid: {', '.join(OBJECTIVES)}")
    runs = parse_variants(args.variants, objectives, ap)

    device = resolve_device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    base_cfg = image_preset(args.preset)
    default_batch = 128
    train_base: dict = {}
    if args.student == "mini":
        from storage_schemas.distill_image import distill_image_preset
        mini = distill_image_preset("mini").student
        base_cfg, default_batch = mini.model, mini.train.batch_size
        train_base = {k: getattr(mini.train, k) for k in ("precision", "lr", "ema_decay")}
    model_cfg = base_cfg.model_copy(update={"distance": "pseudo-huber"})
    if args.tiny:
        model_cfg = KDMImageConfig.model_validate({**model_cfg.model_dump(), "unet": TINY_UNET.model_dump(),
                                                   "latent_proj_dim": None, "img_resolution": 32})
    # the discriminator's weight of '+D' objectives: the preset's, else the official 0.01
    adv_weight = image_preset(args.preset).adv_weight or 0.01
    batch = args.batch or (4 if args.tiny else default_batch)
    sample_batches = [int(b) for b in str(args.sample_batch or (8 if args.tiny else 1000)).split(",")]
    train_cfg = ImageTrainConfig(device="cuda" if device.type == "cuda" else "cpu", batch_size=batch, **train_base)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "gpu": gpu,
            "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "preset": args.preset, "student": args.student, "tiny": args.tiny, "batch": batch,
            "distance": "pseudo-huber", "objectives": objectives, "adv_weight": adv_weight,
            "trainable_parameters": sum(p.numel() for p in KDMImage.from_config(model_cfg).parameters())}
    print(f"# {info['date']}  device {device} ({gpu or platform.processor() or 'cpu'})  torch {torch.__version__}  "
          f"preset {args.preset}{' (tiny)' if args.tiny else ''}  student {args.student}  batch {batch}", flush=True)

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
        if args.out:            # after every variant: a run cut off by a time limit keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        if "error" in r:
            print(f"{name:28s} failed: {r['error']}", flush=True)
        else:
            mem = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "-"
            print(f"{name:28s} {1e3 * r['step_s']:9.1f} ms/step  peak {mem:>10s}  warmup {r['warmup_s']:.1f} s",
                  flush=True)
            prof = r.get("profile")
            if prof:
                print(f"{'':28s} GPU {prof['gpu_ms_per_call']:.1f} ms/step (idle {prof['gpu_idle_ms_per_step']:.1f}), "
                      f"{prof['launches_per_call']} kernels: "
                      + ", ".join(f"{k} {ms:.1f}" for k, ms in prof["ms_by_class"].items()), flush=True)

    ref_cfg = objective_config(model_cfg, DEFAULT_OBJECTIVE, adv_weight)
    if not args.skip_reference:
        record("reference_fp32_eager", lambda: bench_reference(ref_cfg, train_cfg, device, data, args))
    for name, objective in runs:
        key, changes = ENGINE_VARIANTS[name]
        key = key if objective == DEFAULT_OBJECTIVE else f"{key}@{objective}"
        mc = objective_config(model_cfg, objective, adv_weight)
        record(key, lambda: bench_engine(mc, train_cfg, device, data, args, **changes))
    if args.fused_attention:
        record("engine_fp32_tf32_sdpa", lambda: bench_engine(ref_cfg, train_cfg, device, data, args,
                                                             fused_attention=True, precision="fp32"))
        record("engine_bf16_sdpa", lambda: bench_engine(ref_cfg, train_cfg, device, data, args,
                                                        fused_attention=True))
    if args.compile:
        record("engine_bf16_compile", lambda: bench_engine(ref_cfg, train_cfg, device, data, args, compile=True))

    ref = results["train_step"].get("reference_fp32_eager", {})
    speedups = {}
    for name, r in results["train_step"].items():
        if name != "reference_fp32_eager" and "@" not in name and "step_s" in r and "step_s" in ref:
            speedups[name] = ref["step_s"] / r["step_s"]
    results["speedup_vs_reference"] = speedups
    for name, s in speedups.items():
        print(f"speedup {name:20s} {s:6.2f}x", flush=True)

    for name in sampling:
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
