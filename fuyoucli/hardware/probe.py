"""Hardware profile stage, measurement: times this machine and returns a HardwareProfile.

Imports torch inside functions only. CUDA code runs only when torch.cuda.is_available(); without
CUDA the CPU is the compute device and the link figures are host memcpy, labelled as such. Disk
timing is in disk.py; nothing here knows about plans, engines or rich.

Why it is long: every measurement the planner needs (matmul, elementwise, decoder layers, links,
the CUDA context, the CPU optimizer) in one module that may touch CUDA before any engine exists.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

from fuyoucli.hardware import disk as disk_probe
from fuyoucli.hardware import hostinfo
from fuyoucli.hardware.interference import measure_burst_loss, measure_io_loss
from fuyoucli.hardware.llama_layer import llama_layer
from fuyoucli.hardware.profile import (
    SCHEMA_VERSION, AdamRate, BandwidthCurve, BandwidthPoint, ComputeDevice, Disk, ElementwisePoint,
    HardwareProfile, Host, LayerPoint, Links, MatmulPoint, MatmulRates, Provenance,
)

MIB, GIB = 1 << 20, 1 << 30
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class ProbeSpec:
    """How long and how big each measurement is; QUICK and FULL below."""

    mode: str
    matmul_sizes_cpu: tuple[int, ...]
    matmul_sizes_cuda: tuple[int, ...]
    matmul_time_s: float
    link_sizes_bytes: tuple[int, ...]
    link_time_s: float
    copy_bytes: int  # DRAM / device memory copy test buffer
    copy_time_s: float
    adamw_params: int
    adamw_time_s: float
    pinned_cap_bytes: Optional[int]  # None: 80% of available RAM
    pinned_chunk_bytes: int
    pinned_time_s: float
    disk: disk_probe.DiskSpec
    # fp32 tensor sizes (elements) for randn / in-place / new-tensor elementwise rates. On a CPU they
    # straddle the cache sizes and glibc's ~32 MB limit above which a freed block goes back to the OS.
    elementwise_sizes_cpu: tuple[int, ...] = (1 << 18, 1 << 20, 1 << 22, 1 << 24)
    elementwise_sizes_cuda: tuple[int, ...] = (1 << 20, 1 << 24, 1 << 26)
    elementwise_time_s: float = 0.1
    # Operands span this much memory (more than the last-level cache): streamed from memory, as in a step.
    elementwise_footprint_bytes: int = 512 * MIB
    matmul_footprint_bytes: int = 256 * MIB
    # Interference: how much a host computation loses to work in another thread (bursty torch work,
    # disk I/O), each timed against the computation alone for this long.
    log_softmax_rows: int = 128
    interference_time_s: float = 1.0
    interference_file_bytes: int = 256 * MIB
    # Decoder layers timed as a model runs them (the planner's calibration): token counts per forward,
    # layers per timed model, seconds per timing, and the layer's shape (hidden, MLP width, heads).
    layer_tokens_cpu: tuple[int, ...] = (32, 256, 2048)
    layer_tokens_cuda: tuple[int, ...] = (512, 4096, 16384)
    layer_count: int = 3
    layer_time_s: float = 1.0
    layer_shape_cpu: tuple[int, int, int] = (512, 1408, 8)
    layer_shape_cuda: tuple[int, int, int] = (2048, 5632, 16)


QUICK = ProbeSpec("quick", (128, 256, 512, 1024), (1024, 4096, 8192), 0.1, (MIB, 16 * MIB, 256 * MIB), 0.03,
                  256 * MIB, 0.2, 4_000_000, 0.3, 2 * GIB, 512 * MIB, 3.0, disk_probe.QUICK,
                  elementwise_sizes_cpu=(1 << 20, 1 << 24), elementwise_sizes_cuda=(1 << 20, 1 << 26),
                  elementwise_time_s=0.05, interference_time_s=0.5, interference_file_bytes=128 * MIB,
                  layer_tokens_cpu=(64, 512), layer_tokens_cuda=(1024, 8192), layer_time_s=0.4)
FULL = ProbeSpec("full", (128, 256, 512, 1024, 2048), (1024, 2048, 4096, 8192, 16384), 0.3,
                 (MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB), 0.1, GIB, 0.5, 16_000_000, 1.0,
                 None, GIB, 20.0, disk_probe.FULL, elementwise_time_s=0.15)

OnStep = Callable[[str, int, int], None]  # (label, index, total steps)


def probe(disks: Sequence[str | Path] = (".",), *, quick: bool = False, on_step: Optional[OnStep] = None,
          on_detail: Optional[Callable[[str], None]] = None, spec: Optional[ProbeSpec] = None) -> HardwareProfile:
    """Measure everything (spec overrides QUICK/FULL, e.g. tiny sizes in tests). Disk paths are
    checked first so a bad --disk fails before any timing."""
    import torch

    started = time.perf_counter()
    spec = spec or (QUICK if quick else FULL)
    paths = [disk_probe.check_disk_path(d) for d in disks]
    busy_percent = hostinfo.cpu_busy_percent()
    cuda = torch.cuda.is_available()
    all_threads = torch.get_num_threads()
    results: dict[str, object] = {}
    steps: list[tuple[str, Callable[[], None]]] = []

    def step(label: str, fn: Callable[[], object], key: str) -> None:
        steps.append((label, lambda: results.__setitem__(key, fn())))

    for i, p in enumerate(paths):
        step(f"disk {p}", lambda p=p: disk_probe.measure_disk(p, spec.disk, on_detail), f"disk{i}")
        step(f"disk {p}: its I/O's cost to computing", lambda p=p: measure_io_loss(p, spec), f"diskloss{i}")
    for dt in DTYPES:
        step(f"matmul {dt}", lambda dt=dt: measure_matmul(dt, spec, cuda), f"mm_{dt}")
    step("elementwise (randn, axpy)", lambda: measure_elementwise(spec, cuda), "elementwise")
    step("log-softmax", lambda: measure_log_softmax(spec, cuda), "log_softmax")
    step("decoder layers as a model runs them", lambda: measure_layers(spec, cuda), "layers")
    step("host memory copy", lambda: measure_copy_gbps("cpu", spec.copy_bytes, spec.copy_time_s), "dram")
    if cuda:
        step("device memory copy", lambda: measure_copy_gbps("cuda", spec.copy_bytes, spec.copy_time_s), "devmem")
    step("host<->device links" if cuda else "host memcpy", lambda: measure_links(spec, cuda), "links")
    step("pinned memory", lambda: measure_pinned_allocatable(spec, cuda), "pinned")
    step("AdamW 1 thread", lambda: measure_adamw(spec.adamw_params, 1, spec.adamw_time_s), "adam1")
    step(f"AdamW {all_threads} threads",
         lambda: measure_adamw(spec.adamw_params, all_threads, spec.adamw_time_s), "adamN")
    for states, master in COMPACT_FORMATS:
        step(f"AdamW {states} moments, {master} master, {all_threads} threads",
             lambda st=states, ma=master: measure_compact_adamw(spec.adamw_params, all_threads, spec.adamw_time_s,
                                                                st, ma), f"adam_{states}_{master}")
    step("computing beside bursts of other work", lambda: measure_burst_loss(spec), "burst")

    for index, (label, run) in enumerate(steps):
        if on_step:
            on_step(label, index, len(steps))
        run()
    if on_step:
        on_step("done", len(steps), len(steps))

    host = _host(results, all_threads)
    matmul = tuple(results[f"mm_{dt}"] for dt in DTYPES)
    compute = _cuda_device(matmul, results["devmem"], results["elementwise"]) if cuda else ComputeDevice(
        kind="cpu", name=host.cpu_model, count=1, total_memory_bytes=host.ram_total_bytes,
        free_memory_bytes=host.ram_available_bytes, memory_bandwidth_gbps=host.dram_copy_gbps, matmul=matmul,
        note="no CUDA device: the CPU computes; memory is host RAM", elementwise=results["elementwise"],
    )
    fwd_lsm, bwd_lsm = results["log_softmax"]
    compute = dataclasses.replace(compute, log_softmax_elems_per_s=fwd_lsm, log_softmax_backward_elems_per_s=bwd_lsm,
                                  layers=results["layers"])
    disks_out: tuple[Disk, ...] = tuple(
        dataclasses.replace(results[f"disk{i}"], read_compute_loss_s_per_gb=results[f"diskloss{i}"][0],
                            write_compute_loss_s_per_gb=results[f"diskloss{i}"][1]) for i in range(len(paths)))
    return HardwareProfile(
        schema_version=SCHEMA_VERSION, compute=compute, links=results["links"], host=host, disks=disks_out,
        provenance=_provenance(spec.mode, time.perf_counter() - started, torch.__version__, busy_percent,
                               hostinfo.cpu_busy_percent()),
    )


# ---- timing ---------------------------------------------------------------------------------


def _sync_for(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def seconds_per_call(fn: Callable[[], object], sync: Callable[[], None], min_time_s: float) -> float:
    """Mean seconds per call over at least min_time_s, after one untimed warm-up call (which pays
    for page faults, kernel selection and lazy initialisation)."""
    fn()
    sync()
    calls, start = 0, time.perf_counter()
    batch = 1
    while True:
        for _ in range(batch):
            fn()
        sync()
        calls += batch
        elapsed = time.perf_counter() - start
        if elapsed >= min_time_s:
            return elapsed / calls
        # Aim the next batch at the remaining time, so a fast op is not timed one call at a time.
        batch = max(1, min(int((min_time_s - elapsed) / (elapsed / calls)) + 1, 4 * calls))


def best_seconds_per_call(fn: Callable[[], object], sync: Callable[[], None], min_time_s: float,
                          repeats: int = 3) -> float:
    """The median of `repeats` means over min_time_s / repeats each: the sustained rate a run will
    see, robust to one window that caught another process's time slice (an OpenMP team waits for
    its slowest thread) or a burst of turbo. The fastest window overstated a VM's CPU by 10-20%."""
    return sorted(seconds_per_call(fn, sync, min_time_s / repeats) for _ in range(repeats))[repeats // 2]


# ---- compute --------------------------------------------------------------------------------


def measure_matmul(dtype: str, spec: ProbeSpec, cuda: bool) -> MatmulRates:
    """Square products at spec's sizes, on random data (zeros run faster on some GPUs). Sizes whose
    one product would take far longer than the time budget are skipped (slow dtypes on a CPU)."""
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    device = "cuda" if cuda else "cpu"
    sizes = spec.matmul_sizes_cuda if cuda else spec.matmul_sizes_cpu
    points: list[MatmulPoint] = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here, not TF32 tensor cores
    try:
        for n in sizes:
            if points and 2 * n**3 / points[-1].flops > 4 * spec.matmul_time_s:
                break
            if cuda and 4 * n * n * torch_dtype.itemsize > torch.cuda.mem_get_info()[0] // 2:
                break
            try:
                gen = torch.Generator(device=device).manual_seed(n)
                a = torch.randn(n, n, device=device, generator=gen).to(torch_dtype)
                # The right operand cycles through copies spanning more than the caches: a model's
                # weights stream from memory, each used once per pass, and a product whose operand
                # stays cached runs faster than any layer will (by ~10-30% on a CPU).
                count = max(2, min(4096, spec.matmul_footprint_bytes // (n * n * torch_dtype.itemsize)))
                if cuda:
                    count = min(count, max(2, torch.cuda.mem_get_info()[0] // 4 // (n * n * torch_dtype.itemsize)))
                bs = torch.randn(count, n, n, device=device, generator=gen).to(torch_dtype)
                c = torch.empty(n, n, device=device, dtype=torch_dtype)
                turn = itertools.cycle(range(count))
                s = best_seconds_per_call(lambda: torch.mm(a, bs[next(turn)], out=c), _sync_for(device),
                                          spec.matmul_time_s)
            except RuntimeError:  # dtype without a kernel on this device, or out of memory
                break
            points.append(MatmulPoint(size=n, flops=2 * n**3 / s))
            del a, bs, c
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return MatmulRates(dtype=dtype, points=tuple(points))


def measure_copy_gbps(device: str, nbytes: int, min_time_s: float) -> float:
    """Large copy within one memory (host DRAM or device memory); counts bytes read + written."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)  # untouched pages all map to the shared zero page, which reads from cache
    dst = torch.empty_like(src)
    s = seconds_per_call(lambda: dst.copy_(src), _sync_for(device), min_time_s)
    return 2 * nbytes / s / 1e9


def measure_elementwise(spec: ProbeSpec, cuda: bool) -> tuple[ElementwisePoint, ...]:
    """fp32 rates at spec's tensor sizes: normals from a seeded stream into an existing tensor (how
    zo2 draws z: kernels/normal.py, the compiled counter stream on a CPU), y.add_(x, alpha) in place,
    the same add into a new tensor each call (every out-of-place op of a forward, and home + s*eps*z),
    and a 2-norm (gradient clipping). Each call takes the next of several tensors spanning more than
    the caches, as a step over a model's weights does. Sizes that do not fit are skipped."""
    import torch

    from fuyoucli.kernels.normal import NormalStream

    device = "cuda" if cuda else "cpu"
    sync = _sync_for(device)
    points = []
    for n in spec.elementwise_sizes_cuda if cuda else spec.elementwise_sizes_cpu:
        count = max(2, spec.elementwise_footprint_bytes // (3 * 4 * n))
        if cuda and 5 * 4 * n * count > torch.cuda.mem_get_info()[0] // 2:
            count = 2
            if 5 * 4 * n * count > torch.cuda.mem_get_info()[0] // 2:
                break
        gen = torch.Generator(device=device).manual_seed(n)
        xs = torch.randn(count, n, device=device, generator=gen)
        ys = torch.randn(count, n, device=device, generator=gen)
        zs = torch.zeros(count, n, device=device)  # touched: a first touch's page faults are no part of a draw
        turn = itertools.cycle(range(count))
        stream = NormalStream(device, n)
        randn_s = best_seconds_per_call(lambda: stream.fill(zs[next(turn)]), sync, spec.elementwise_time_s)
        inplace_s = best_seconds_per_call(lambda: ys[(i := next(turn))].add_(xs[i], alpha=1e-3), sync,
                                          spec.elementwise_time_s)
        fresh_s = best_seconds_per_call(lambda: torch.add(xs[(i := next(turn))], zs[i], alpha=1e-3), sync,
                                        spec.elementwise_time_s)
        norm_s = best_seconds_per_call(lambda: torch.linalg.vector_norm(xs[next(turn)]), sync, spec.elementwise_time_s)
        points.append(ElementwisePoint(params=n, randn_params_per_s=n / randn_s, inplace_gbps=12 * n / inplace_s / 1e9,
                                       fresh_gbps=12 * n / fresh_s / 1e9, norm_gbps=4 * n / norm_s / 1e9))
        del xs, ys, zs
    return tuple(points)


def measure_log_softmax(spec: ProbeSpec, cuda: bool) -> tuple[float, float]:
    """(forward, backward) fp32 log-softmax elements per second over 32768-wide rows, as the loss
    runs over a vocabulary: an exp and a log per element, which a CPU computes far below its
    memory rate."""
    import torch

    device = "cuda" if cuda else "cpu"
    sync = _sync_for(device)
    x = torch.randn(spec.log_softmax_rows, 32768, device=device, requires_grad=True)
    grad = torch.randn(spec.log_softmax_rows, 32768, device=device)
    with torch.no_grad():
        fwd_s = best_seconds_per_call(lambda: torch.log_softmax(x, dim=-1), sync, spec.elementwise_time_s)
    y = torch.log_softmax(x, dim=-1)
    bwd_s = best_seconds_per_call(lambda: torch.autograd.grad(y, x, grad, retain_graph=True), sync,
                                  spec.elementwise_time_s)
    return x.numel() / fwd_s, x.numel() / bwd_s


def measure_layers(spec: ProbeSpec, cuda: bool) -> tuple[LayerPoint, ...]:
    """Per-layer seconds of transformers' Llama decoder layers (random weights; fp32 on a CPU, bf16 on a
    GPU, as fuyou runs each) at spec's token counts: a forward with autograd recording, its backward
    (every weight's gradient), and an inference forward; with the inventory's numbers for the layer,
    which the planner prices to calibrate itself (LayerPoint). The model is `layer_count` layers fed
    embeddings directly, so its per-forward work (rotary tables, the mask) is shared as in a model."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    device = "cuda" if cuda else "cpu"
    sync = _sync_for(device)
    dtype, torch_dtype = ("bf16", torch.bfloat16) if cuda else ("fp32", torch.float32)
    hidden, width, heads = spec.layer_shape_cuda if cuda else spec.layer_shape_cpu
    tokens_list = spec.layer_tokens_cuda if cuda else spec.layer_tokens_cpu
    max_seq = 2048 if cuda else 512
    config = LlamaConfig(hidden_size=hidden, intermediate_size=width, num_attention_heads=heads,
                         num_key_value_heads=heads, num_hidden_layers=spec.layer_count, vocab_size=256,
                         max_position_embeddings=max_seq, tie_word_embeddings=False)
    layer = llama_layer(hidden, width, heads, heads, hidden // heads)  # as the planner counts the layer
    torch.manual_seed(0)
    model = LlamaModel(config)
    model = model.to(device=device, dtype=torch_dtype).train()
    params = list(model.parameters())
    points = []
    for tokens in tokens_list:
        seq = min(tokens, max_seq)
        batch = max(1, tokens // seq)
        try:
            x = torch.randn(batch, seq, hidden, device=device, dtype=torch_dtype, requires_grad=True)
            times = {"fwd": [], "bwd": [], "inf": []}

            def once() -> None:
                for p in params:
                    p.grad = None
                t0 = time.perf_counter()
                y = model(inputs_embeds=x, use_cache=False).last_hidden_state
                sync()
                t1 = time.perf_counter()
                y.backward(torch.ones_like(y))
                sync()
                t2 = time.perf_counter()
                with torch.no_grad():
                    model(inputs_embeds=x, use_cache=False)
                sync()
                t3 = time.perf_counter()
                for key, s in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[key].append(s)

            once()  # warm-up: kernel choice, the allocator's first blocks
            for v in times.values():
                v.clear()
            start = time.perf_counter()
            while len(times["fwd"]) < 3 or (time.perf_counter() - start < spec.layer_time_s and len(times["fwd"]) < 50):
                once()
        except RuntimeError:  # out of memory on a small device: keep the counts measured so far
            break
        med = {k: sorted(v)[len(v) // 2] / spec.layer_count for k, v in times.items()}
        points.append(LayerPoint(
            dtype=dtype, tokens=batch * seq, seq_len=seq, hidden=hidden, params=layer.params,
            max_tensor_params=max(layer.tensors), matmul_flops_per_token=layer.matmul_flops_per_token,
            attention_flops_per_token_per_key=layer.attention_flops_per_token_per_key,
            elementwise_elems_per_token=layer.elementwise_elems_per_token,
            forward_s=med["fwd"], forward_no_grad_s=med["inf"], backward_s=med["bwd"]))
        del x
    del model, params
    return tuple(points)


def context_bytes(total_bytes: int, free_bytes: int, reserved_bytes: int) -> int:
    """The device memory this process holds outside torch's caching allocator (its CUDA context): what
    the device has in use less what the allocator reserved. Other processes' memory on the same GPU
    is in use too, so this is an upper bound on a shared GPU."""
    return max(0, total_bytes - free_bytes - reserved_bytes)


def _cuda_device(matmul: tuple[MatmulRates, ...], devmem_gbps: float,
                 elementwise: tuple[ElementwisePoint, ...] = ()) -> ComputeDevice:
    import torch

    # Called after every measurement: the context exists and its kernels (cuBLAS products, the decoder
    # layers') have loaded, as they will have in a run. Cached blocks go back first, so that `free`
    # counts them as free and what torch still reserves is only what stays allocated (workspaces).
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(0)
    context = context_bytes(total, free, torch.cuda.memory_reserved(0))
    major, minor = torch.cuda.get_device_capability(0)
    count = torch.cuda.device_count()
    return ComputeDevice(
        kind="cuda", name=torch.cuda.get_device_name(0), count=count, total_memory_bytes=total,
        free_memory_bytes=free, memory_bandwidth_gbps=devmem_gbps, matmul=matmul, elementwise=elementwise,
        context_bytes=context,
        note=f"compute capability {major}.{minor}; fp32 without TF32"
        + (f"; measured cuda:0 of {count}" if count > 1 else ""),
    )


# ---- links ----------------------------------------------------------------------------------


def measure_links(spec: ProbeSpec, cuda: bool) -> Links:
    return _cuda_links(spec) if cuda else _memcpy_links(spec)


def _curve(pairs: list[tuple[int, float]]) -> BandwidthCurve:
    return BandwidthCurve(points=tuple(BandwidthPoint(size_bytes=s, gbps=g) for s, g in pairs))


def _memcpy_links(spec: ProbeSpec) -> Links:
    """No CUDA: the 'device' is host RAM, so a transfer is a copy between two host buffers."""
    import torch

    top = max(spec.link_sizes_bytes)
    bufs = [torch.empty(top, dtype=torch.uint8).fill_(1) for _ in range(4)]
    one, h2d, d2h = [], [], []
    for size in spec.link_sizes_bytes:
        a, b, c, d = (x[:size] for x in bufs)
        s = seconds_per_call(lambda: b.copy_(a), lambda: None, spec.link_time_s)
        one.append((size, size / s / 1e9))
        g1, g2 = _concurrent_gbps(lambda: b.copy_(a), lambda: d.copy_(c), size, spec.link_time_s)
        h2d.append((size, g1))
        d2h.append((size, g2))
    curve = _curve(one)
    return Links(kind="host_memcpy", h2d_pinned=curve, h2d_pageable=curve, d2h_pinned=curve, d2h_pageable=curve,
                 duplex_h2d_pinned=_curve(h2d), duplex_d2h_pinned=_curve(d2h),
                 note="no CUDA: every figure is a torch copy between two host buffers (host memcpy), "
                      "not a host<->device link; duplex is two such copies running at once")


def _concurrent_gbps(copy_a: Callable[[], object], copy_b: Callable[[], object], size: int,
                     time_s: float) -> tuple[float, float]:
    """Run two host copies in two threads for time_s; each one's own rate while the other runs."""
    import torch

    # Each copy gets half the intra-op threads: two full-width OpenMP teams on the same cores spin
    # against each other and measure oversubscription instead of memory bandwidth.
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, old_threads // 2))
    try:
        return _two_at_once(copy_a, copy_b, size, time_s)
    finally:
        torch.set_num_threads(old_threads)


def _two_at_once(copy_a: Callable[[], object], copy_b: Callable[[], object], size: int,
                 time_s: float) -> tuple[float, float]:
    copy_a(), copy_b()
    barrier = threading.Barrier(2)
    out = [0.0, 0.0]

    def loop(i: int, fn: Callable[[], object]) -> None:
        barrier.wait()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < time_s or n == 0:
            fn()  # torch copies release the GIL, so the two threads really overlap
            n += 1
        out[i] = n * size / (time.perf_counter() - start) / 1e9

    threads = [threading.Thread(target=loop, args=(i, fn), daemon=True) for i, fn in enumerate((copy_a, copy_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out[0], out[1]


def _cuda_links(spec: ProbeSpec) -> Links:
    import torch

    top = max(spec.link_sizes_bytes)
    pin_a, pin_b = (torch.empty(top, dtype=torch.uint8, pin_memory=True).fill_(1) for _ in range(2))
    page = torch.empty(top, dtype=torch.uint8).fill_(1)
    dev_a, dev_b = (torch.empty(top, dtype=torch.uint8, device="cuda").fill_(1) for _ in range(2))
    sync, t = torch.cuda.synchronize, spec.link_time_s
    curves: dict[str, list[tuple[int, float]]] = {k: [] for k in ("h2d", "h2d_pg", "d2h", "d2h_pg", "dh", "dd")}
    for size in spec.link_sizes_bytes:
        pa, pb, pg, da, db = pin_a[:size], pin_b[:size], page[:size], dev_a[:size], dev_b[:size]
        for key, fn in (("h2d", lambda: da.copy_(pa, non_blocking=True)), ("h2d_pg", lambda: da.copy_(pg)),
                        ("d2h", lambda: pa.copy_(da, non_blocking=True)), ("d2h_pg", lambda: pg.copy_(da))):
            curves[key].append((size, size / seconds_per_call(fn, sync, t) / 1e9))
        reps = max(2, int(t * curves["h2d"][-1][1] * 1e9 / size))
        up_gbps, down_gbps = _cuda_duplex(pa, da, pb, db, reps)
        curves["dh"].append((size, up_gbps))
        curves["dd"].append((size, down_gbps))
    del pin_a, pin_b, page, dev_a, dev_b
    _release_pinned_cache()
    return Links(kind="host_device", h2d_pinned=_curve(curves["h2d"]), h2d_pageable=_curve(curves["h2d_pg"]),
                 d2h_pinned=_curve(curves["d2h"]), d2h_pageable=_curve(curves["d2h_pg"]),
                 duplex_h2d_pinned=_curve(curves["dh"]), duplex_d2h_pinned=_curve(curves["dd"]),
                 note="cuda:0; pinned = page-locked host memory copied with non_blocking=True")


def _cuda_duplex(pin_up, dev_up, pin_down, dev_down, reps: int) -> tuple[float, float]:
    """H2D and D2H on two streams at once; enqueued alternately so both directions start together."""
    import torch

    up, down = torch.cuda.Stream(), torch.cuda.Stream()
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    torch.cuda.synchronize()
    with torch.cuda.stream(up):
        marks[0].record()
    with torch.cuda.stream(down):
        marks[2].record()
    for _ in range(reps):
        with torch.cuda.stream(up):
            dev_up.copy_(pin_up, non_blocking=True)
        with torch.cuda.stream(down):
            pin_down.copy_(dev_down, non_blocking=True)
    with torch.cuda.stream(up):
        marks[1].record()
    with torch.cuda.stream(down):
        marks[3].record()
    torch.cuda.synchronize()
    size = pin_up.numel()
    return (reps * size / (marks[0].elapsed_time(marks[1]) / 1e3) / 1e9,
            reps * size / (marks[2].elapsed_time(marks[3]) / 1e3) / 1e9)


# ---- host -----------------------------------------------------------------------------------


def measure_pinned_allocatable(spec: ProbeSpec, cuda: bool) -> tuple[Optional[int], bool]:
    """(bytes of pinned memory allocated, whether the probe stopped at its cap or deadline before a
    failure). (None, False) without CUDA: pinned memory only matters for host<->GPU copies."""
    if not cuda:
        return None, False
    import psutil
    import torch

    cap = spec.pinned_cap_bytes or int(0.8 * psutil.virtual_memory().available)
    deadline = time.perf_counter() + spec.pinned_time_s
    blocks, total, capped = [], 0, True
    try:
        while total + spec.pinned_chunk_bytes <= cap and time.perf_counter() < deadline:
            try:
                blocks.append(torch.empty(spec.pinned_chunk_bytes, dtype=torch.uint8, pin_memory=True))
            except RuntimeError:  # cudaHostAlloc refused: this is the real limit
                capped = False
                break
            total += spec.pinned_chunk_bytes
    finally:
        blocks.clear()
        _release_pinned_cache()
    return total, capped


def _release_pinned_cache() -> None:
    import torch

    # torch keeps freed pinned blocks cached; hand them back so the machine is as we found it.
    memory = getattr(getattr(torch, "accelerator", None), "memory", None)
    empty = getattr(memory, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def measure_adamw(n_params: int, threads: int, min_time_s: float) -> tuple[float, str]:
    """(fp32 parameters updated per second, the optimizer call timed) with torch on `threads` threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        # A few tensors, like a decoder block's weights; together far larger than the CPU caches.
        params = [torch.nn.Parameter(torch.randn(n_params // 4, generator=gen)) for _ in range(4)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        try:
            opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
            opt.step()
            impl = "torch.optim.AdamW(fused=True)"
        except (RuntimeError, ValueError, TypeError):  # older torch: no fused CPU kernel
            opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
            impl = "torch.optim.AdamW(foreach=True)"
        s = seconds_per_call(opt.step, lambda: None, min_time_s)
    finally:
        torch.set_num_threads(old)
    return 4 * (n_params // 4) / s, impl


COMPACT_FORMATS = (("int8", "fp32"), ("fp32", "bf16"), ("int8", "bf16"))
"""The compact AdamW formats (method.states, method.master) whose CPU rate the profile measures."""


def measure_compact_adamw(n_params: int, threads: int, min_time_s: float, states: str, master: str) -> float:
    """Parameters per second of the compact-state AdamW the engine runs (kernels/adamw.py) on `threads`
    threads, on tensors like measure_adamw's."""
    import torch

    from fuyoucli.kernels.adamw import AdamFormat, CompactAdamW
    from fuyoucli.kernels.rounding import stochastic_round_

    class _Round:  # as the engine's rounding: a seed the compiled chunk draws from, a generator for the torch ops
        seed = 1
        gen = torch.Generator().manual_seed(1)

        def store(self, dst, src32):
            return stochastic_round_(dst, src32, self.gen)

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        dtype = torch.float32 if master == "fp32" else torch.bfloat16
        params = [torch.randn(n_params // 4, generator=gen).to(dtype) for _ in range(4)]
        grads = {id(p): torch.randn(p.shape, generator=gen) for p in params}
        opt = CompactAdamW(params, fmt=AdamFormat(states, master), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=0.01, rounding=lambda step, device, stream: _Round())
        s = seconds_per_call(lambda: opt.step(grads=grads), lambda: None, min_time_s)
    finally:
        torch.set_num_threads(old)
    return 4 * (n_params // 4) / s


def _host(results: dict[str, object], all_threads: int) -> Host:
    import psutil

    vm = psutil.virtual_memory()
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    pinned, capped = results["pinned"]
    (rate1, impl), (rate_all, _impl) = results["adam1"], results["adamN"]
    note = ("pinned memory: not applicable without CUDA" if pinned is None
            else "pinned figure is a lower bound: the probe stopped at its cap" if capped else "")
    return Host(
        cpu_model=hostinfo.cpu_model(), physical_cores=physical, logical_cores=logical, ram_total_bytes=vm.total,
        ram_available_bytes=vm.available, memlock_limit_bytes=hostinfo.memlock_limit_bytes(),
        pinned_allocatable_bytes=pinned, pinned_probe_capped=capped, dram_copy_gbps=results["dram"],
        adamw_impl=impl, adamw_1thread_params_per_s=rate1, adamw_all_threads_params_per_s=rate_all,
        adamw_threads=all_threads, note=note, burst_compute_loss=results["burst"],
        adamw_compact=tuple(AdamRate(st, ma, results[f"adam_{st}_{ma}"]) for st, ma in COMPACT_FORMATS),
    )


def _provenance(mode: str, duration_s: float, torch_version: str, busy_start: float, busy_end: float) -> Provenance:
    from fuyoucli import __version__

    busy = max(busy_start, busy_end)
    note = (f"other work kept the CPUs {busy:.0f}% busy (at the start: {busy_start:.0f}%, at the end: "
            f"{busy_end:.0f}%): CPU figures may be low; profile again on an idle machine" if busy > 25 else "")
    return Provenance(
        source="measured", mode=mode, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        hostname=socket.gethostname(), fuyou_version=__version__, torch_version=torch_version,
        python_version=platform.python_version(), platform=platform.platform(), duration_s=duration_s,
        cpu_busy_percent_at_start=busy_start, cpu_busy_percent_at_end=busy_end, note=note,
    )
