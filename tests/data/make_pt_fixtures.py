#!/usr/bin/python3
"""Writes the small torch.save fixtures in tests/data/pt/ used by tests/test_torch_checkpoint.cpp.

Run with Debian's python3-torch (1.13): `/usr/bin/python3 tests/data/make_pt_fixtures.py`.
Expected tensor values go to companion `.expected.safetensors` files written by the same script,
so the C++ test compares bit-exactly against what PyTorch itself pickled.

Nothing here needs network access; every value comes from a seeded generator.
"""
import argparse
import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile
import zlib

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pt")
# The hostile fixtures would `touch` this file if they were ever executed (by Python's pickle).
MARKER = "/tmp/mdd_pt_fixture_pwned_marker"


# --------------------------------------------------------------------------- safetensors writer
# A tiny writer (not the safetensors package, which python3-torch does not ship) matching the
# format spec: 8-byte LE header length, JSON header, concatenated little-endian data.
ST_DTYPES = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def save_safetensors(path, tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        # bf16 has no numpy dtype: go through int16 to get the raw bytes.
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * ((8 - len(js) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)))
        f.write(js)
        for b in blobs:
            f.write(b)


# --------------------------------------------------------------------------- hand-made archives
class FakeStorage:
    """Stands for a storage record when crafting data.pkl by hand (malformed fixtures)."""

    def __init__(self, key, storage_type, numel):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class FakeTensor:
    """Pickles exactly as a tensor does: torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class CraftPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def craft_pickle(root):
    buf = io.BytesIO()
    CraftPickler(buf, protocol=2).dump(root)
    return buf.getvalue()


def write_archive(path, data_pkl, records, compress=False):
    """A zip laid out like torch.save's: archive/data.pkl, archive/data/<key>, archive/version."""
    members = {"archive/data.pkl": data_pkl}
    members.update({f"archive/data/{key}": raw for key, raw in records.items()})
    members["archive/version"] = b"3\n"
    write_zip(path, members, compress)


def write_zip(path, members, compress):
    # Fixed timestamps so that re-running the script reproduces the committed bytes.
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data, compress_type=method)


def read_archive(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i.filename) for i in z.infolist()}


def write_zip64(path, members):
    """Writes `members` (name -> bytes, STORED) with ZIP64 records everywhere: every size and offset
    in the central directory is 0xFFFFFFFF with the real value in a zip64 extra field, and the end
    of the archive has a zip64 end record + locator. Checkpoints over 4 GB look like this."""
    out, central = bytearray(), bytearray()
    for name, data in members.items():
        n = name.encode()
        crc = zlib.crc32(data) & 0xFFFFFFFF
        offset = len(out)
        local_extra = struct.pack("<HHQQ", 1, 16, len(data), len(data))
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(n),
                           len(local_extra)) + n + local_extra + data
        extra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                               len(n), len(extra), 0, 0, 0, 0, 0xFFFFFFFF) + n + extra
    cd_offset = len(out)
    out += central
    z64 = len(out)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(members), len(members), len(central), cd_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, z64, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    with open(path, "wb") as f:
        f.write(out)


class Evil:
    """Its __reduce__ makes Python's unpickler run `touch MARKER` (os.system is pickled as posix.system)."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class EvilEval:
    def __reduce__(self):
        return (eval, (f"open('{MARKER}', 'w')",))


# --------------------------------------------------------------------------- fixtures
def mixed_state_dict(g):
    sd = collections.OrderedDict()
    sd["f32.weight"] = torch.randn(3, 5, generator=g)
    sd["f16.weight"] = torch.randn(4, 2, generator=g).half()
    sd["bf16.weight"] = torch.randn(2, 3, generator=g).bfloat16()
    sd["f64.bias"] = torch.randn(5, generator=g).double()
    sd["i64.steps"] = torch.tensor([0, -1, 2 ** 40, -(2 ** 62)], dtype=torch.int64)
    sd["i32.index"] = torch.randint(-1000, 1000, (2, 2), generator=g, dtype=torch.int32)
    sd["i16.index"] = torch.tensor([-300, 301], dtype=torch.int16)
    sd["i8.index"] = torch.tensor([-128, 127, 0], dtype=torch.int8)
    sd["u8.pixels"] = torch.randint(0, 256, (2, 3, 2), generator=g, dtype=torch.uint8)
    sd["bool.mask"] = torch.tensor([True, False, True, True])
    sd["scalar"] = torch.tensor(3.25)
    sd["empty"] = torch.zeros(0, 4)
    sd["block.0.conv.weight"] = torch.randn(2, 1, 3, 3, generator=g)
    return sd


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    p = lambda name: os.path.join(args.out, name)
    g = torch.Generator().manual_seed(20240601)

    # 1. A released-style checkpoint: a plain OrderedDict state_dict with mixed dtypes.
    sd = mixed_state_dict(g)
    torch.save(sd, p("state_dict.pt"))
    save_safetensors(p("state_dict.expected.safetensors"), sd)

    # 2. A fine-tuning checkpoint like train_dit.py writes: {model, ema, opt, args: Namespace}.
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g))
    ema = collections.OrderedDict((k, v.detach().clone() * 0.5) for k, v in model.state_dict().items())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(5, 3, generator=g)).square().mean().backward()
    opt.step()
    ns = argparse.Namespace(model="DiT-XL/2", lr=1e-4, epochs=8, spec="woof", condense=True,
                            tags=["a", "b"], ckpt=None, sizes=(256, 256))
    ckpt = {"model": model.state_dict(), "ema": ema, "opt": opt.state_dict(), "args": ns}
    torch.save(ckpt, p("train_ckpt.pt"))
    expected = {}
    for entry in ("model", "ema"):
        for k, v in ckpt[entry].items():
            expected[f"{entry}.{k}"] = v
    for idx, st in ckpt["opt"]["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                expected[f"opt.state.{idx}.{k}"] = v
    save_safetensors(p("train_ckpt.expected.safetensors"), expected)

    # 3. Views sharing one storage: transpose, slices with an offset, a row, an expand (stride 0).
    base = torch.arange(24, dtype=torch.float32).view(4, 6) * 0.5 - 3
    other = torch.randn(10, generator=g).half()
    views = collections.OrderedDict()
    views["base"] = base
    views["t"] = base.t()
    views["slice"] = base[1:3, 2:5]
    views["row"] = base[2]
    views["expand"] = base[3:4, :].expand(3, 6)
    views["step"] = base[:, ::2]
    views["h"] = other[2:8]
    views["h_all"] = other
    views["param"] = torch.nn.Parameter(torch.arange(3, dtype=torch.float32))  # _rebuild_parameter
    torch.save(views, p("views.pt"))
    meta = {}
    for k, v in views.items():
        meta[f"stride.{k}"] = ",".join(map(str, v.stride()))
        meta[f"offset.{k}"] = str(v.storage_offset())
    save_safetensors(p("views.expected.safetensors"), {k: v.contiguous() for k, v in views.items()}, meta)

    # 4. The same state_dict with DEFLATED members, and with ZIP64 records everywhere.
    members = read_archive(p("state_dict.pt"))
    prefix = next(n for n in members if n.endswith("/data.pkl")).split("/")[0]
    write_zip(p("deflated.pt"), members, compress=True)
    write_zip64(p("zip64.pt"), members)

    # 5. Legacy (pre-1.6) serialisation: refused with a clear message.
    torch.save(collections.OrderedDict(w=torch.ones(2)), p("legacy.pt"), _use_new_zipfile_serialization=False)

    # 6. Hostile pickles: never executed; loading must throw and the marker must not appear.
    torch.save({"w": torch.ones(2), "payload": Evil()}, p("hostile_system.pt"))
    torch.save({"w": torch.ones(2), "payload": EvilEval()}, p("hostile_eval.pt"))
    # A call of an unknown (not denylisted) global: refused because it is not on the allowlist.
    unknown = b"\x80\x02}q\x00X\x01\x00\x00\x00xcmdd_fixture_module\nrun\nX\x03\x00\x00\x00abc\x85Rs."
    write_archive(p("hostile_unknown_call.pt"), unknown, {})

    # 7. Malformed archives crafted by hand (tensor extents, storage keys, persistent ids).
    st = FakeStorage("0", torch.FloatStorage, 6)
    six = struct.pack("<6f", *range(6))
    write_archive(p("ok_crafted.pt"), craft_pickle({"a": FakeTensor(st, 1, [2, 2], [2, 1])}), {"0": six})
    write_archive(p("bad_extent.pt"), craft_pickle({"a": FakeTensor(st, 2, [2, 3], [3, 1])}), {"0": six})
    write_archive(p("bad_overflow.pt"),
                  craft_pickle({"a": FakeTensor(st, 0, [2 ** 62, 4], [2 ** 62, 1])}), {"0": six})
    write_archive(p("missing_key.pt"), craft_pickle({"a": FakeTensor(FakeStorage("9", torch.FloatStorage, 6), 0, [6], [1])}),
                  {"0": six})
    write_archive(p("bad_numel.pt"), craft_pickle({"a": FakeTensor(FakeStorage("0", torch.FloatStorage, 7), 0, [6], [1])}),
                  {"0": six})
    write_archive(p("not_storage.pt"), craft_pickle({"a": FakeTensor(6, 0, [6], [1])}), {"0": six})

    # torch 2.x style: tensor rebuilt with the 7-argument _rebuild_tensor_v2 (metadata) over a
    # torch.UntypedStorage (bytes). torch 1.13 has no torch.UntypedStorage, so a stand-in class is
    # registered under that name just long enough to pickle the reference.
    class UntypedStorage:
        pass
    UntypedStorage.__module__, UntypedStorage.__qualname__ = "torch", "UntypedStorage"
    had = hasattr(torch, "UntypedStorage")
    saved = getattr(torch, "UntypedStorage", None)
    torch.UntypedStorage = UntypedStorage
    try:
        ut = FakeStorage("0", UntypedStorage, 8)
        t2 = FakeTensor(ut, 2, [2, 3], [3, 1])
        t2.args = t2.args + ({},)
        write_archive(p("torch2_style.pt"), craft_pickle({"u8": t2}), {"0": bytes(range(10, 18))})
    finally:
        if had:
            torch.UntypedStorage = saved
        else:
            del torch.UntypedStorage

    # 8. Resource exhaustion: a 1 MB key reused through the memo 100k times (would copy 100 GB),
    # dicts shared 2^40 ways (exponential flattening), dicts nested 100 deep. DEFLATED keeps them tiny.
    big = b"\x80\x02X" + struct.pack("<I", 1 << 20) + b"k" * (1 << 20) + b"q\x00]" + b"}h\x00h\x00sa" * 100000 + b"."
    write_archive(p("amplify.pt"), big, {}, compress=True)
    d = {"w": FakeTensor(st, 0, [6], [1])}
    for _ in range(40):
        d = {"a": d, "b": d}
    write_archive(p("explode.pt"), craft_pickle(d), {"0": six}, compress=True)
    d = {"w": FakeTensor(st, 0, [6], [1])}
    for _ in range(100):
        d = {"x": d}
    write_archive(p("deep.pt"), craft_pickle(d), {"0": six}, compress=True)

    # 9. The input budget (mdd::io::InputLimits): a stride-0 view of 6 stored floats that claims
    # 2^40 elements (4 TB once materialised), one that repeats its storage 1000x, and a 16 MB pickle
    # of empty lists deflated to a few KB (each list an object: ~1.6 GB of objects without a cap
    # that scales with the bytes in the file).
    write_archive(p("huge_view.pt"), craft_pickle({"a": FakeTensor(st, 0, [2 ** 20, 2 ** 20], [0, 0])}), {"0": six})
    write_archive(p("broadcast_view.pt"), craft_pickle({"a": FakeTensor(st, 0, [1000, 6], [0, 1])}), {"0": six})
    bomb = b"\x80\x02" + b"]0" * (1 << 23) + b"}."
    write_archive(p("pickle_bomb.pt"), bomb, {}, compress=True)

    total = sum(os.path.getsize(p(f)) for f in os.listdir(args.out))
    print(f"wrote {len(os.listdir(args.out))} files, {total} bytes, to {args.out}")
    if os.path.exists(MARKER):
        sys.exit(f"{MARKER} exists: remove it (nothing here should create it)")


if __name__ == "__main__":
    main()
