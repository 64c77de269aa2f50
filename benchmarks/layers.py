"""Where the dense VGG's time goes, per layer and per input shape, on this machine.

    python benchmarks/layers.py [--model vgg16] [--sizes 256x341,384x512,512x683] [--precision auto] [--images 1]

Runs featx's own plan (featx.net.plan.Plan, the path `featx extract` takes) on --images images
and their flips at each size, times every trunk step and the fc6/fc7 head (best of
--repeats), and prints each layer's milliseconds, GFLOP/s, and share of the forward pass, beside
the same plan with oneDNN's direct kernel for every conv (no Winograd). GFLOP/s count a direct
convolution's FLOPs (featx.net.backbones.vgg.layer_table) for both, so Winograd's show as "effective".
`ONEDNN_MAX_CPU_ISA=AVX2` in front emulates an AVX2-only CPU (precision auto is then fp32).
`--errors` adds each conv's relative L2 error against fp32 on the same input (the exact fp32
trunk's, rounded to the precision), featx's step beside oneDNN's direct kernel.
"""

from __future__ import annotations

import argparse
import time

from machine import cpu_isa, cpu_name


def main() -> None:
    import torch

    from featx.extract.config import ExtractConfig
    from featx.extract.describer import make_describer
    from featx.net.backbones.vgg import layer_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--sizes", default="256x341,384x512,512x683", help="HxW of the rescaled image")
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--images",
        type=int,
        default=1,
        help="images per batch, each with its flip (featx extract's CPU passes hold ~720k pixels: 4 at 256x341)",
    )
    p.add_argument(
        "--fresh-outputs",
        action="store_true",
        help="allocate every activation afresh (Plan(reuse_activations=False)), for comparison",
    )
    p.add_argument("--errors", action="store_true", help="also each conv's error against fp32 (featx and direct)")
    args = p.parse_args()

    config = ExtractConfig(model=args.model, weights="random", precision=args.precision, device="cpu")
    describer = make_describer(config)
    reuse = not args.fresh_outputs
    device, dtype = describer.device, describer.dtype
    plans = {
        "featx": describer.plan if reuse else describer.net.lower(device, dtype, reuse_activations=False),
        "direct": describer.net.lower(device, dtype, fast_conv=False, reuse_activations=reuse),
    }
    print(
        f"{args.model}, {describer.precision}, {cpu_name()} ({cpu_isa()}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"batch = {args.images} image(s) + flip(s){'; every output allocated afresh' if args.fresh_outputs else ''}"
    )
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        x = torch.randn(2 * args.images, 3, h, w).to(describer.dtype).contiguous(memory_format=torch.channels_last)
        times = {}
        with torch.inference_mode():
            for kind, plan in plans.items():
                # The trunk in the plan's own passes (as Plan.__call__ runs it), then the head.
                passes = [x[part] for part in plan.passes(x)]
                plan(x)  # warm-up: primitive creation for this shape
                rows: list[float] = []
                for _ in range(args.repeats):
                    t_all = [0.0] * (len(plan.trunk) + 1)
                    maps = []
                    for part in passes:
                        marks = [time.perf_counter()]
                        maps.append(
                            plan.pool5(part, after_step=lambda i, marks=marks: marks.append(time.perf_counter()))[0]
                        )
                        for i in range(len(plan.trunk)):
                            t_all[i] += marks[i + 1] - marks[i]
                    t = time.perf_counter()
                    plan.position_sums(torch.cat(maps))
                    t_all[-1] = time.perf_counter() - t
                    rows = t_all if not rows else [min(a, b) for a, b in zip(rows, t_all)]
                times[kind] = rows
        rows, direct = times["featx"], times["direct"]
        kinds = [type(step).__name__.replace("Conv", " conv").strip() for step in plans["featx"].trunk] + ["head"]
        # FLOPs from featx's one counter (featx.net.backbones.vgg.layer_table), x2 for the flips.
        table = layer_table(describer.net, h, w)
        trunk = [r for r in table if r.name.startswith(("conv", "pool"))]
        head = [r for r in table if r.name.startswith("fc")]
        names = [r.name for r in trunk] + ["+".join(r.name for r in head)]
        n = 2 * args.images
        flops = [n * r.flops for r in trunk] + [n * sum(r.flops for r in head)]
        assert len(names) == len(rows), (names, len(rows))  # one plan step per trunk layer
        total = sum(rows)
        print(
            f"\n{h}x{w}: {total * 1e3:.0f} ms, {sum(flops) / total / 1e9:.0f} GFLOP/s (effective) overall; "
            f"direct kernels only: {sum(direct) * 1e3:.0f} ms ({sum(direct) / total:.2f}x featx's time)"
        )
        print(f"  {'layer':<24} {'featx':>11} {'GFLOP/s':>7} {'share':>6}  {'kernel':<14} {'direct':>9} {'GFLOP/s':>7}")
        for name, kind, t, td, f in zip(names, kinds, rows, direct, flops):
            rate, rate_d = (f"{f / t / 1e9:7.0f}", f"{f / td / 1e9:7.0f}") if f else ("      -", "      -")
            print(
                f"  {name:<24} {t * 1e3:8.1f} ms {rate} {100 * t / total:5.1f}%  {kind:<14} {td * 1e3:6.1f} ms {rate_d}"
            )
        if args.errors:
            print_errors(describer.net, plans, x, names)


def print_errors(net, plans: dict, x, names: list[str]) -> None:
    """Per conv: relative L2 error of featx's step and of the direct kernel against fp32, each on
    the exact fp32 trunk's input to that layer rounded to the plan's precision."""
    import torch

    exact = net.lower(torch.device("cpu"), torch.float32, fast_conv=False, reuse_activations=False)
    dtype = plans["featx"].dtype
    print(f"  per-layer error against fp32 (relative L2), inputs rounded to {dtype}:")
    print(f"  {'layer':<24} {'featx':>9} {'direct':>9}")
    xin = x.float()
    with torch.inference_mode():
        for i, step in enumerate(exact.trunk):
            y = step(xin)
            if hasattr(step, "bias"):  # a conv
                errors = [
                    float((plans[kind].trunk[i](xin.to(dtype)).float() - y).norm() / y.norm())
                    for kind in ("featx", "direct")
                ]
                print(f"  {names[i]:<24} {errors[0]:9.5f} {errors[1]:9.5f}")
            xin = y


if __name__ == "__main__":
    main()
