#!/usr/bin/env python3
"""Side-by-side timing: the same workloads through mdd (C++, `bench_side_by_side`) and through
PyTorch eager, alternating in one run, with the ratio PyTorch / mdd per workload.

The PyTorch side is this project's own small implementation of what the reference code runs (the
DiT architecture of facebookresearch/DiT, its hybrid training loss, the respaced DDPM sampler with
classifier-free guidance, the DC ConvNet-3 evaluation); it exists only to measure, never ships.

    python3 benchmarks/side_by_side.py --mdd-bench build/benchmarks/bench_side_by_side --rounds 3
    python3 benchmarks/side_by_side.py --device cuda --workloads xl2 --json out.json   # PyTorch only
    # the issue's comparison: mdd in bf16 against the reference's fp32 eager
    python3 benchmarks/side_by_side.py --mdd-bench build/benchmarks/bench_side_by_side --precision fp32 --mdd-precision bf16

mdd runs with its host-allocator settings, as the bundled programs do (mdd/util/host_allocator.h);
MDD_HOST_ALLOCATOR=default in the environment measures it with glibc's defaults instead.

Workloads (same names in bench_side_by_side.cpp):
    demo_forward_b200   Fashion-MNIST demo DiT (28 px, patch 4, width 96, depth 4) forward, batch 200
    demo_train_b64      its training step (hybrid loss, backward, AdamW, EMA), batch 64
    s2_forward_b8       DiT-S/2 (32x32x4 latents) forward, batch 8
    s2_train_b8         DiT-S/2 training step, batch 8
    demo_sample_100     50-step DDPM sampling of 100 images with CFG 2 (demo DiT)
    dc_eval_100         one `dc` evaluation: ConvNet-3 on 100 images (301 passes) + 10k test images
    xl2_forward_b8, xl2_difffit_train_b8, xl2_cfg_call_b50   (GPU check; PyTorch side only)
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------- model


def sincos_2d(dim, grid):
    """Fixed 2-D sine-cosine position table [grid*grid, dim] (half the channels per axis)."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)
    gy, gx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_axis(dim // 2, gx), one_axis(dim // 2, gy)], dim=1).float()


def timestep_features(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def attention(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if hasattr(F, "scaled_dot_product_attention"):  # what timm runs on torch >= 2
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = ((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, c))

    def forward(self, x, c):
        s1, g1, a1, s2, g2, a2 = self.ada(c).chunk(6, dim=1)
        h = self.norm1(x) * (1 + g1.unsqueeze(1)) + s1.unsqueeze(1)
        x = x + a1.unsqueeze(1) * self.attention(h)
        h = self.norm2(x) * (1 + g2.unsqueeze(1)) + s2.unsqueeze(1)
        return x + a2.unsqueeze(1) * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class DiT(nn.Module):
    def __init__(self, input_size, patch, channels, width, depth, heads, classes):
        super().__init__()
        self.patch, self.channels, self.grid = patch, channels, input_size // patch
        self.embed = nn.Conv2d(channels, width, patch, patch)
        self.register_buffer("pos", sincos_2d(width, self.grid).unsqueeze(0))
        self.t_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.labels = nn.Embedding(classes + 1, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final = nn.Linear(width, patch * patch * 2 * channels)
        for p in self.parameters():  # small random weights everywhere (timing only)
            nn.init.normal_(p, std=0.02)

    def forward(self, x, t, y):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        c = self.t_mlp(timestep_features(t)) + self.labels(y)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        x = self.final(self.final_norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
        b, p, g, oc = x.shape[0], self.patch, self.grid, 2 * self.channels
        return x.reshape(b, g, g, p, p, oc).permute(0, 5, 1, 3, 2, 4).reshape(b, oc, g * p, g * p)


# ------------------------------------------------------------------------------------- diffusion


class Diffusion:
    """Linear-beta DDPM with learned-range variance (the reference's create_diffusion defaults)."""

    def __init__(self, steps=1000, use=None):
        full = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        ac_full = torch.cumprod(1 - full, 0)
        self.timestep_map = list(range(1000)) if use is None else use
        if use is None:
            betas = full
        else:
            last, b = 1.0, []
            for i in use:
                b.append(1 - ac_full[i].item() / last)
                last = ac_full[i].item()
            betas = torch.tensor(b, dtype=torch.float64)
        self.n = len(betas)
        self.betas = betas
        ac = torch.cumprod(1 - betas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.sqrt_ac, self.sqrt_1mac = ac.sqrt(), (1 - ac).sqrt()
        self.sqrt_recip_ac, self.sqrt_recipm1_ac = (1 / ac).sqrt(), (1 / ac - 1).sqrt()
        post_var = betas * (1 - ac_prev) / (1 - ac)
        self.post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.coef1 = betas * ac_prev.sqrt() / (1 - ac)
        self.coef2 = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)
        self.log_betas = betas.log()

    @staticmethod
    def at(a, t, x):
        return a.to(x.device)[t].float().reshape(-1, *([1] * (x.dim() - 1)))

    def p_mean_var(self, out, x, t):
        c = x.shape[1]
        eps, v = out[:, :c], out[:, c:]
        frac = (v + 1) / 2
        logvar = frac * self.at(self.log_betas, t, x) + (1 - frac) * self.at(self.post_logvar, t, x)
        x0 = self.at(self.sqrt_recip_ac, t, x) * x - self.at(self.sqrt_recipm1_ac, t, x) * eps
        mean = self.at(self.coef1, t, x) * x0 + self.at(self.coef2, t, x) * x
        return mean, logvar, x0

    def training_loss(self, model, x0, t, y, noise):
        xt = self.at(self.sqrt_ac, t, x0) * x0 + self.at(self.sqrt_1mac, t, x0) * noise
        out = model(xt, t, y).float()
        c = x0.shape[1]
        mse = ((noise - out[:, :c]) ** 2).mean(dim=(1, 2, 3))
        frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
        mean, logvar, _ = self.p_mean_var(frozen, xt, t)
        true_mean = self.at(self.coef1, t, x0) * x0 + self.at(self.coef2, t, x0) * xt
        true_logvar = self.at(self.post_logvar, t, x0)
        kl = 0.5 * (-1 + logvar - true_logvar + (true_logvar - logvar).exp() + (true_mean - mean) ** 2 * (-logvar).exp())
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2)
        # Decoder NLL at t = 0 (discretised Gaussian on 8-bit bins).
        centered, inv = x0 - mean, (-0.5 * logvar).exp()
        cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
        up, lo = cdf(inv * (centered + 1 / 255)), cdf(inv * (centered - 1 / 255))
        logp = torch.where(x0 < -0.999, up.clamp(min=1e-12).log(),
                           torch.where(x0 > 0.999, (1 - lo).clamp(min=1e-12).log(), (up - lo).clamp(min=1e-12).log()))
        nll = -logp.mean(dim=(1, 2, 3)) / math.log(2)
        return (mse + torch.where(t == 0, nll, kl)).mean()

    def sample(self, model, labels, shape, null, scale, gen):
        x = torch.randn(len(labels), *shape, generator=gen).to(labels.device)
        tmap = torch.tensor(self.timestep_map, device=labels.device)
        y = torch.cat([labels, torch.full_like(labels, null)])
        for i in reversed(range(self.n)):
            t = torch.full((len(labels),), i, dtype=torch.long, device=labels.device)
            out = model(torch.cat([x, x]), tmap[torch.cat([t, t])], y).float()
            cond, uncond = out.chunk(2)
            g = min(3, out.shape[1])  # the reference guides model_out[:, :3]
            out = torch.cat([uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:]], dim=1)
            mean, logvar, _ = self.p_mean_var(out, x, t)
            noise = torch.randn(x.shape, generator=gen).to(x.device)
            x = mean + (i > 0) * (0.5 * logvar).exp() * noise
        return x


def respaced(n):
    stride = (1000 - 1) / (n - 1)
    return sorted({round(i * stride) for i in range(n)})


# ------------------------------------------------------------------------------------ evaluation


class ConvNet3(nn.Module):
    def __init__(self, channels=1, classes=10, width=128, size=28):
        super().__init__()
        layers, c, s = [], channels, size
        for d in range(3):
            pad = 3 if (d == 0 and channels == 1 and size == 28) else 1
            layers += [nn.Conv2d(c, width, 3, padding=pad), nn.GroupNorm(width, width, affine=True), nn.ReLU(),
                       nn.AvgPool2d(2, 2)]
            s = (s + 2 * pad - 2) // 2
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * s * s, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def dc_evaluation(train_x, train_y, test_x, test_y):
    net = ConvNet3()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for ep in range(301):
        if ep == 151:
            opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9, weight_decay=5e-4)
        perm = torch.randperm(len(train_x))
        for b in range(0, len(train_x), 256):
            idx = perm[b:b + 256]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(train_x[idx]), train_y[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        correct = sum((net(test_x[b:b + 500]).argmax(1) == test_y[b:b + 500]).sum().item() for b in range(0, len(test_x), 500))
    return correct / len(test_x)


# ------------------------------------------------------------------------------------- workloads


def train_step_fn(model, diffusion, batch, shape, classes, dev, amp, difffit=False):
    params = [p for n, p in model.named_parameters() if (not difffit) or n.endswith("bias") or "labels" in n]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0)
    ema = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, *shape, generator=g).to(dev)
    y = torch.randint(0, classes, (batch,), generator=g).to(dev)

    def step():
        t = torch.randint(0, 1000, (batch,), generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = diffusion.training_loss(model, x0, t, y, noise)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.mul_(0.9999).add_(p.detach(), alpha=1e-4)
    return step


def forward_fn(model, batch, shape, classes, dev, amp):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(dev)
    t = torch.randint(0, 1000, (batch,), generator=g).to(dev)
    y = torch.randint(0, classes, (batch,), generator=g).to(dev)

    def run():
        with torch.no_grad(), amp():
            model(x, t, y)
    return run


def make_workloads(dev, amp, which):
    demo = lambda: DiT(28, 4, 1, 96, 4, 4, 10).to(dev)
    s2 = lambda: DiT(32, 2, 4, 384, 12, 6, 1000).to(dev)
    xl2 = lambda: DiT(32, 2, 4, 1152, 28, 16, 1000).to(dev)
    w = {}
    if "demo" in which:
        w["demo_forward_b200"] = lambda: forward_fn(demo().eval(), 200, (1, 28, 28), 10, dev, amp)
        w["demo_train_b64"] = lambda: train_step_fn(demo(), Diffusion(), 64, (1, 28, 28), 10, dev, amp)
        w["s2_forward_b8"] = lambda: forward_fn(s2().eval(), 8, (4, 32, 32), 1000, dev, amp)
        w["s2_train_b8"] = lambda: train_step_fn(s2(), Diffusion(), 8, (4, 32, 32), 1000, dev, amp)

        def sample():
            m, d = demo().eval(), Diffusion(use=respaced(50))
            labels = torch.arange(100, device=dev) % 10
            def run():
                with torch.no_grad(), amp():
                    d.sample(m, labels, (1, 28, 28), 10, 2.0, torch.Generator().manual_seed(0))
            return run
        w["demo_sample_100"] = sample

        def dc():
            g = torch.Generator().manual_seed(0)
            tx, ty = torch.randn(100, 1, 28, 28, generator=g), torch.arange(100) % 10
            vx, vy = torch.randn(10000, 1, 28, 28, generator=g), torch.randint(0, 10, (10000,), generator=g)
            return lambda: dc_evaluation(tx, ty, vx, vy)
        w["dc_eval_100"] = dc
    if "xl2" in which:
        w["xl2_forward_b8"] = lambda: forward_fn(xl2().eval(), 8, (4, 32, 32), 1000, dev, amp)
        w["xl2_difffit_train_b8"] = lambda: train_step_fn(xl2(), Diffusion(), 8, (4, 32, 32), 1000, dev, amp, difffit=True)

        def cfg_call():
            m = xl2().eval()
            x = torch.randn(100, 4, 32, 32, device=dev)
            t = torch.full((100,), 500, device=dev)
            y = torch.randint(0, 1001, (100,), device=dev)
            def run():
                with torch.no_grad(), amp():
                    out = m(x, t, y).float()
                    c, u = out.chunk(2)
                    torch.cat([u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]), c[:, 3:]], 1)
            return run
        w["xl2_cfg_call_b50"] = cfg_call
    return w


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_python(fn, dev, min_time):
    fn()  # warm-up
    sync(dev)
    n, start = 0, time.perf_counter()
    while True:
        fn()
        sync(dev)
        n += 1
        el = time.perf_counter() - start
        if el >= min_time:
            return el / n


def time_mdd(binary, name, min_time, precision):
    # UseRealTime() appends "/real_time" to the registered name; accept both spellings.
    out = subprocess.run([binary, f"--benchmark_filter=^{name}/{precision}(/real_time)?$", "--benchmark_format=json",
                          f"--benchmark_min_time={min_time}"], check=True, capture_output=True, text=True).stdout
    runs = [b for b in json.loads(out)["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
    if not runs:
        raise SystemExit(f"side_by_side: {binary} has no benchmark {name}/{precision}")
    b = runs[0]
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b.get("time_unit", "ns")]
    return b["real_time"] * scale


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mdd-bench", help="bench_side_by_side binary (omit: PyTorch side only)")
    ap.add_argument("--workloads", default="demo", help="demo | xl2 | comma list of workload names")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the PyTorch side's precision")
    ap.add_argument("--mdd-precision", choices=["fp32", "bf16"],
                    help="mdd's precision (default: --precision); the issue's targets compare mdd bf16 with "
                         "the reference's fp32 eager: --precision fp32 --mdd-precision bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    a.mdd_precision = a.mdd_precision or a.precision
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if a.precision == "bf16":
        amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)
    else:
        import contextlib
        amp = contextlib.nullcontext
    groups = {g for g in ("demo", "xl2") if g in a.workloads.split(",")}
    all_w = make_workloads(dev, amp, groups or {"demo", "xl2"})
    names = [n for n in all_w if (n.split("_")[0] in groups) or n in a.workloads.split(",") or
             (n.startswith(("demo", "s2", "dc")) and "demo" in groups)]
    built = {n: all_w[n]() for n in names}
    res = {n: {"pytorch_s": [], "mdd_s": []} for n in names}
    for r in range(a.rounds):
        for n in names:  # alternate: mdd, then PyTorch, per workload, every round
            if a.mdd_bench:
                res[n]["mdd_s"].append(time_mdd(a.mdd_bench, n, a.min_time, a.mdd_precision))
            res[n]["pytorch_s"].append(time_python(built[n], dev, a.min_time))
            print(f"round {r + 1}/{a.rounds} {n}: pytorch {res[n]['pytorch_s'][-1]:.4f} s"
                  + (f", mdd {res[n]['mdd_s'][-1]:.4f} s" if a.mdd_bench else ""), file=sys.stderr)
    print(f"\n| workload | PyTorch {torch.__version__} eager ({a.precision}) s | mdd ({a.mdd_precision}) s | PyTorch / mdd |")
    print("|---|---|---|---|")
    for n in names:
        p = statistics.median(res[n]["pytorch_s"])
        m = statistics.median(res[n]["mdd_s"]) if res[n]["mdd_s"] else float("nan")
        res[n].update(pytorch_median_s=p, mdd_median_s=m, ratio=p / m if m == m else None)
        print(f"| {n} | {p:.4f} | {m:.4f} | {p / m:.2f}x |" if m == m else f"| {n} | {p:.4f} | - | - |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(dev), "precision": a.precision, "mdd_precision": a.mdd_precision,
                       "threads": torch.get_num_threads(), "rounds": a.rounds, "workloads": res}, f, indent=2)


if __name__ == "__main__":
    main()
