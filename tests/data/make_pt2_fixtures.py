#!/usr/bin/env python3
"""Writes the fixtures of files made by PyTorch 2.x and by the `safetensors` package, used by
tests/test_torch_checkpoint.cpp (TorchCheckpoint.Torch2*) and tests/test_safetensors.cpp.

Run with the pinned wheel that CI's LibTorch 2.x leg uses (scripts/test.sh --torch2 installs it):
    ~/.cache/mdd/torch-2.11.0/bin/pip install safetensors
    ~/.cache/mdd/torch-2.11.0/bin/python tests/data/make_pt2_fixtures.py

Every value comes from a seeded generator; expected tensors go to `.expected.safetensors` files
written by the `safetensors` package itself (dtypes LibTorch 1.13 lacks are stored as mdd
widens them: uint16 -> int32, uint32/uint64 -> int64, float8 -> float32), so the C++ test compares bit-exactly against what PyTorch pickled.
"""
import argparse
import collections
import os
import zipfile

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pt2")


def every_dtype(g):
    """One tensor per storage dtype torch.save writes, plus views, strides, 0-d and empty ones."""
    f = torch.randn(3, 5, generator=g)
    d = collections.OrderedDict()
    d["f32"] = f
    d["f64"] = torch.randn(2, 3, generator=g, dtype=torch.float64)
    d["f16"] = torch.randn(4, generator=g).half()
    d["bf16"] = torch.randn(2, 2, generator=g).bfloat16()
    d["i8"] = torch.randint(-128, 128, (5,), generator=g, dtype=torch.int8)
    d["i16"] = torch.randint(-30000, 30000, (3,), generator=g, dtype=torch.int16)
    d["i32"] = torch.randint(-2**31, 2**31 - 1, (3,), generator=g, dtype=torch.int32)
    d["i64"] = torch.randint(-2**62, 2**62, (3,), generator=g, dtype=torch.int64)
    d["u8"] = torch.randint(0, 256, (6,), generator=g, dtype=torch.uint8)
    d["bool"] = torch.rand(5, generator=g) > 0.5
    d["u16"] = torch.randint(0, 2**16, (4,), generator=g, dtype=torch.int64).to(torch.uint16)
    d["u32"] = torch.randint(0, 2**31, (4,), generator=g, dtype=torch.int64).to(torch.uint32)
    d["u64"] = torch.randint(0, 2**62, (4,), generator=g, dtype=torch.int64).to(torch.uint64)
    d["f8e4m3"] = torch.randn(4, generator=g).to(torch.float8_e4m3fn)
    d["f8e5m2"] = torch.randn(4, generator=g).to(torch.float8_e5m2)
    d["scalar"] = torch.tensor(3.5)
    d["empty"] = torch.empty(0, 4)
    d["row_view"] = f[1]                # shares f's storage at an offset
    d["transposed"] = f.t()             # non-contiguous strides
    d["param"] = torch.nn.Parameter(torch.randn(2, generator=g))
    return d


def widened(t):
    """What mdd returns for dtypes without a native LibTorch 1.13 equivalent (documented widening)."""
    if t.dtype == torch.uint16:
        return t.to(torch.int32)
    if t.dtype == torch.uint32:
        return t.to(torch.int64)
    if t.dtype == torch.uint64:
        return t.to(torch.int64)  # values < 2^63 here
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.to(torch.float32)
    return t


def expected(d):
    return {k: widened(v.detach()).contiguous().clone() for k, v in d.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    g = torch.Generator().manual_seed(2024)
    sd = every_dtype(g)
    # 1. A state_dict with every dtype, default torch.save (zip with byteorder, .data/version,
    #    .data/serialization_id records).
    torch.save(sd, os.path.join(a.out, "every_dtype.pt"))
    save_file(expected(sd), os.path.join(a.out, "every_dtype.expected.safetensors"),
              metadata={"torch": torch.__version__})
    # 2. A training checkpoint of plain containers, loadable with torch.load(weights_only=True).
    model = collections.OrderedDict((k, torch.randn(3, generator=g)) for k in ("a.weight", "a.bias"))
    ema = collections.OrderedDict((k, v * 0.5) for k, v in model.items())
    ck = {"model": model, "ema": ema, "step": 1200, "lr": 1e-3, "tags": ["x", "y"], "flags": (True, None)}
    torch.save(ck, os.path.join(a.out, "weights_only_ckpt.pt"))
    torch.load(os.path.join(a.out, "weights_only_ckpt.pt"), weights_only=True)  # really weights-only
    save_file({**{"model." + k: v for k, v in model.items()}, **{"ema." + k: v for k, v in ema.items()}},
              os.path.join(a.out, "weights_only_ckpt.expected.safetensors"))
    # 3. safetensors written by the safetensors package (incl. F8 and unsigned dtypes).
    st = {k: v.detach().contiguous() for k, v in sd.items() if k not in ("row_view", "transposed")}
    save_file(st, os.path.join(a.out, "package.safetensors"), metadata={"format": "pt"})
    save_file({k: widened(v) for k, v in st.items()}, os.path.join(a.out, "package.expected.safetensors"))
    for name in sorted(os.listdir(a.out)):
        p = os.path.join(a.out, name)
        rec = ""
        if name.endswith(".pt"):
            with zipfile.ZipFile(p) as z:
                rec = " records: " + ", ".join(sorted({n.split("/", 1)[1] for n in z.namelist()} - {"data.pkl"})[:6])
        print(f"{name}: {os.path.getsize(p)} bytes{rec}")


if __name__ == "__main__":
    main()
