"""Peak RSS and throughput of streaming a checkpoint, versus loading it whole.

Builds a synthetic bf16 model (default 32 tensors x 32 MiB = 1 GiB, in 3+ shards) in a temp
directory, then measures, each in a fresh subprocess so peaks do not mix:

* stream: every tensor through ``CheckpointReader.get`` -> ``ShardedWriter.add`` (read + write);
* naive:  ``safetensors.torch.load_file`` of every shard into one dict, then ``save_file`` per shard
  (``load_file`` mmaps; the mapped pages count toward RSS as ``save_file`` touches them).

Reports the RSS right after the imports (baseline: current RSS and ``ru_maxrss``) and ``ru_maxrss``
at the end (peak), plus MB/s of tensor data. Both runs read from a warm page cache (the files were
just written). Finally the streamed output is checked bit-for-bit against the source.

    python benchmarks/io_stream_rss.py [--tensors 32] [--tensor-mib 32] [--shard-mib 384]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STREAM_GOAL_MB = 300


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mb() -> float:
    """Current resident set (Linux /proc); ru_maxrss right after imports also counts import-time peaks."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return _maxrss_mb()


def _child(mode: str, src: Path, dst: Path, shard_bytes: int) -> None:
    import torch  # noqa: F401  (imported before the baseline so both modes pay the same)
    from safetensors.torch import load_file, save_file

    from quantize.io.reader import CheckpointReader
    from quantize.io.writer import ShardedWriter

    baseline, baseline_peak = _rss_mb(), _maxrss_mb()
    t0 = time.perf_counter()
    with CheckpointReader(src) as reader:
        nbytes, shards = reader.total_bytes, reader.shards
        groups = {s: [n for n in reader.names() if reader.file_of(n) == s] for s in shards}
        if mode == "stream":
            with ShardedWriter(dst, max_shard_bytes=shard_bytes) as writer:
                for name in reader.names():
                    writer.add(name, reader.get(name))
                writer.close()
    if mode == "naive":
        everything = {}
        for shard in shards:
            everything.update(load_file(src / shard))
        dst.mkdir(parents=True)
        for shard, names in groups.items():
            save_file({n: everything[n] for n in names}, dst / shard, metadata={"format": "pt"})
    seconds = time.perf_counter() - t0
    result = {"mode": mode, "baseline_mb": baseline, "import_peak_mb": baseline_peak, "peak_mb": _maxrss_mb()}
    print(json.dumps({**result, "seconds": seconds, "bytes": nbytes}))


def _build(src: Path, n_tensors: int, tensor_mib: int, shard_bytes: int) -> None:
    import torch

    from quantize.io.writer import ShardedWriter

    rows = tensor_mib * (1 << 20) // (2 * 4096)
    g = torch.Generator().manual_seed(0)
    with ShardedWriter(src, max_shard_bytes=shard_bytes) as w:
        for i in range(n_tensors):
            w.add(f"model.layers.{i}.weight", torch.randn(rows, 4096, generator=g, dtype=torch.bfloat16))
        w.close()


def _verify(src: Path, dst: Path) -> int:
    import torch

    from quantize.io.reader import CheckpointReader

    a, b = CheckpointReader(src), CheckpointReader(dst)
    assert a.names() == b.names(), "tensor names differ"
    for name in a.names():
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name
    return len(a.names())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--tensor-mib", type=int, default=32)
    ap.add_argument("--shard-mib", type=int, default=384)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    shard_bytes = args.shard_mib << 20
    if args.child:
        mode, src, dst = args.child
        _child(mode, Path(src), Path(dst), shard_bytes)
        return 0

    with tempfile.TemporaryDirectory(prefix="io_stream_rss-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        t0 = time.perf_counter()
        _build(src, args.tensors, args.tensor_mib, shard_bytes)
        n_shards = len(list(src.glob("*.safetensors")))
        size_mb = sum(p.stat().st_size for p in src.iterdir()) / 1e6
        print(f"synthetic model: {args.tensors} x {args.tensor_mib} MiB bf16, {n_shards} shards, "
              f"{size_mb:.0f} MB on disk (built in {time.perf_counter() - t0:.1f}s)")
        results = {}
        for mode in ("stream", "naive"):
            cmd = [sys.executable, __file__, "--shard-mib", str(args.shard_mib)]
            cmd += ["--child", mode, str(src), str(tmp / mode)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
        checked = _verify(src, tmp / "stream")

    print(f"{'':22}{'stream (reader->writer)':>26}{'naive load_file+save_file':>28}")
    rows = [
        ("RSS after imports (MB)", lambda r: f"{r['baseline_mb']:.0f}"),
        ("maxrss after imports", lambda r: f"{r['import_peak_mb']:.0f}"),
        ("peak RSS (MB)", lambda r: f"{r['peak_mb']:.0f}"),
        ("peak - after imports", lambda r: f"{r['peak_mb'] - r['baseline_mb']:.0f}"),
        ("time (s)", lambda r: f"{r['seconds']:.2f}"),
        ("throughput (MB/s)", lambda r: f"{r['bytes'] / 1e6 / r['seconds']:.0f}"),
    ]
    for label, fmt in rows:
        print(f"{label:22}{fmt(results['stream']):>26}{fmt(results['naive']):>28}")
    print(f"streamed output verified bit-identical ({checked} tensors)")
    peak = results["stream"]["peak_mb"]
    verdict = "OK" if peak < STREAM_GOAL_MB else "OVER GOAL"
    print(f"stream peak RSS {peak:.0f} MB vs goal < {STREAM_GOAL_MB} MB: {verdict}")
    return 0 if peak < STREAM_GOAL_MB else 1


if __name__ == "__main__":
    sys.exit(main())
