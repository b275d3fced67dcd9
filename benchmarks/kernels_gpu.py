"""GPU decode latency of babai::linear_triton (packed b-bit) vs bf16 torch.mm, and GB/s
against the device's measured copy bandwidth. Not a test; needs CUDA (written for an H100).

For each weight shape N×K (4096×4096, 4096×14336, 14336×4096, 8192×28672) and batch
M ∈ {1, 4, 16}: median CUDA-event time of ``x @ Wᵀ`` in bf16 (torch.mm), of the fused
kernel at 4 bit (and 2/3/8 with --all-bits), of dense 4-bit + 0.5 % SSQR outliers, and of
torchao's int4 weight-only path when it runs, and of torch's tinygemm int4 kernel
(``torch._weight_int4pack_mm``, the kernel under torchao's path) without torchao. Calls are
replayed from CUDA graphs (``--eager``: plain calls). GB/s counts the bytes the kernel must read
(codes + scales + zeros + x + outliers, + output written); the roofline is a device-to-device
``copy_`` of a 1 GiB buffer (bytes read + written).

With ``--hptq``: for the first three shapes, HPTQ weights (integer codes of a discrete
Gaussian at ≈ 3.3 bits of entropy, canonical-Huffman-coded with ``--hptq-chunk``): the
load-time decode kernel's throughput (GB/s of stream read, Gsymbols/s) and the matmul that
decodes inside the kernel (``babai::hptq_linear_triton``) against bf16 ``torch.mm``.

    python benchmarks/kernels_gpu.py [--group-size 128] [--all-bits] [--hptq] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (N out, K in)
BATCHES = [1, 4, 16]


def cuda_time(fn, reps: int = 50, warmup: int = 10, graph: bool = True) -> float:
    """Median seconds per call, CUDA events, L2 flushed between calls. With ``graph``, the
    call is captured once in a CUDA graph and replayed, so Python and launch overhead (which
    dominate a few-microsecond decode GEMV) drop out; eager if capture fails."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):  # also runs the autotuner, before any capture
        fn()
    torch.cuda.synchronize()
    call = fn
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            call = g.replay
        except Exception as e:  # noqa: BLE001  (report and time eagerly)
            print(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:80]}); eager")
            torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        call()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() / t


def random_packed(n: int, k: int, bits: int, gs: int, outlier_frac: float = 0.0) -> dict:
    from babai_ao.formats.packing import pack

    g = k // gs
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.int32, device="cuda")
    zeros = torch.randint(0, 2**bits, (1, n * g), dtype=torch.int32, device="cuda")
    layer = dict(packed=pack(codes, bits), scales=(torch.rand(n, g, device="cuda") * 0.01)
                 .half(), zeros=pack(zeros, bits).reshape(-1), bits=bits, group_size=gs,
                 in_features=k)
    if outlier_frac:
        per_row = max(1, int(outlier_frac * k))
        idx = torch.stack([torch.randperm(k, device="cuda")[:per_row] for _ in range(n)])
        layer.update(outlier_ptr=torch.arange(0, n * per_row + 1, per_row, device="cuda",
                                              dtype=torch.int32),
                     outlier_idx=idx.sort(1).values.reshape(-1).to(torch.int16),
                     outlier_val=torch.randint(-20, 20, (n * per_row,), device="cuda",
                                               dtype=torch.int32))
    return layer


def layer_bytes(layer: dict, m: int) -> int:
    tensors = [v for v in layer.values() if isinstance(v, torch.Tensor)]
    n, k = layer["packed"].shape[0], layer["in_features"]
    return sum(t.numel() * t.element_size() for t in tensors) + 2 * m * (k + n)


def torchao_int4(w: torch.Tensor, gs: int):
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16,
                              device="cuda")
        lin.weight.data.copy_(w)
        quantize_(lin, Int4WeightOnlyConfig(group_size=gs))
        return lin
    except Exception as e:
        print(f"torchao int4 unavailable: {type(e).__name__}: {str(e)[:160]}")
        return None


def aten_int4(w: torch.Tensor, gs: int):
    """torch's own tinygemm int4 kernel (what torchao's int4 weight-only path calls on CUDA),
    for machines without torchao: ``x -> _weight_int4pack_mm(x, packed, gs, scales_zeros)``."""
    try:
        n, k = w.shape
        g = w.float().reshape(n, k // gs, gs)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8),
                                                   8)
        zero = lo + 8 * scale  # tinygemm: w = (q − 8)·scale + zero
        sz = torch.stack([scale, zero], -1).reshape(n, k // gs, 2).transpose(0, 1)
        sz = sz.contiguous().to(torch.bfloat16)

        def run(x):
            return torch._weight_int4pack_mm(x, packed, gs, sz)

        x = torch.randn(4, k, device=w.device, dtype=torch.bfloat16)
        ref = x.float() @ (q.reshape(n, k // gs, gs) * scale + lo).reshape(n, k).t()
        err = (run(x).float() - ref).abs().max() / ref.abs().max()
        if err > 2e-2:
            raise RuntimeError(f"packing mismatch: relative error {err:.3g} vs dequantized")
        return run
    except Exception as e:  # noqa: BLE001
        print(f"aten int4 (tinygemm) unavailable: {type(e).__name__}: {str(e)[:160]}")
        return None


def hptq_rows(chunk: int, bw: float) -> list[dict]:
    """Decode throughput and in-matmul decode latency of HPTQ streams (first three shapes)."""
    from babai_ao.kernels.huffman import decode_table, huffman_decode

    from babai_ao.formats import huffman

    rows = []
    for n, k in SHAPES[:3]:
        codes = torch.round(torch.randn(n * k) * 2.0).to(torch.int32)  # H ≈ 3.1 bits
        st = huffman.encode(codes, chunk=chunk)
        dev = {f: getattr(st, f).cuda() for f in ("bitstream", "symbols", "lengths", "offsets")}
        table = decode_table(dev["symbols"], dev["lengths"], st.max_len)
        scale = torch.tensor([0.01], device="cuda", dtype=torch.float16)
        out = huffman_decode(dev["bitstream"], dev["offsets"], table, n * k, chunk, st.max_len)
        assert torch.equal(out.cpu(), codes), "decode kernel disagrees with the encoder"
        t_dec = cuda_time(functools.partial(huffman_decode, dev["bitstream"], dev["offsets"],
                                            table, n * k, chunk, st.max_len))
        row = {"N": n, "K": k, "bits": 8 * st.nbytes / (n * k), "max_len": st.max_len,
               "decode_us": t_dec * 1e6, "decode_stream_GBps": st.nbytes / t_dec / 1e9,
               "decode_Gsym_s": n * k / t_dec / 1e9,
               "decode_roofline": (st.nbytes + 4 * n * k) / t_dec / bw}
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        lin = functools.partial(torch.ops.babai.hptq_linear_triton, **dev, scale=scale,
                                bias=None, out_features=n, in_features=k, chunk=chunk,
                                max_len=st.max_len)
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = cuda_time(lambda x=x, w=w: torch.mm(x, w.t()))
            t = cuda_time(lambda x=x, lin=lin: lin(x))
            row[f"M{m}_bf16_us"], row[f"M{m}_hptq_us"] = t_bf16 * 1e6, t * 1e6
            row[f"M{m}_speedup"] = t_bf16 / t
        rows.append(row)
        print(" ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}"
                       for key, val in row.items()), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--all-bits", action="store_true")
    p.add_argument("--hptq", action="store_true", help="also HPTQ decode / in-matmul rows")
    p.add_argument("--hptq-chunk", type=int, default=256)
    p.add_argument("--eager", action="store_true", help="time plain calls, no CUDA graphs")
    p.add_argument("--json")
    args = p.parse_args()
    if args.eager:
        global cuda_time
        cuda_time = functools.partial(cuda_time, graph=False)
    import babai_ao.kernels  # noqa: F401  (registers babai::linear_triton)

    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"measured copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    bits_list = (2, 3, 4, 8) if args.all_bits else (4,)
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        ao = torchao_int4(w, args.group_size)
        tiny = aten_int4(w, args.group_size)
        layers = {f"{b}-bit": random_packed(n, k, b, args.group_size) for b in bits_list}
        layers["4-bit+0.5% SSQR"] = random_packed(n, k, 4, args.group_size, 0.005)
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = cuda_time(lambda x=x, w=w: torch.mm(x, w.t()))
            row = {"N": n, "K": k, "M": m, "bf16_us": t_bf16 * 1e6,
                   "bf16_GBps": (2 * n * k + 2 * m * (n + k)) / t_bf16 / 1e9}
            for name, layer in layers.items():
                t = cuda_time(lambda x=x, layer=layer:
                              torch.ops.babai.linear_triton(x, bias=None, **layer))
                row[f"{name}_us"] = t * 1e6
                row[f"{name}_speedup"] = t_bf16 / t
                row[f"{name}_GBps"] = layer_bytes(layer, m) / t / 1e9
                row[f"{name}_roofline"] = layer_bytes(layer, m) / t / bw
            if ao is not None:
                t = cuda_time(lambda x=x, ao=ao: ao(x))
                row["torchao_int4_us"] = t * 1e6
                row["torchao_int4_speedup"] = t_bf16 / t
            if tiny is not None:
                t = cuda_time(lambda x=x, tiny=tiny: tiny(x))
                row["aten_int4_us"] = t * 1e6
                row["aten_int4_speedup"] = t_bf16 / t
            rows.append(row)
            print(" ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}"
                           for key, val in row.items()), flush=True)
    hptq = hptq_rows(args.hptq_chunk, bw) if args.hptq else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9,
                       "torch": torch.__version__, "rows": rows, "hptq": hptq}, f, indent=1)


if __name__ == "__main__":
    main()
