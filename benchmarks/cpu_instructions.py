"""What one kept pair of weights costs on this CPU, by the instruction sequence a 2:4 kernel would use for it.

    python benchmarks/cpu_instructions.py --out benchmarks/results/cpu-instructions

Why: from 16 tokens up the CPU kernel is compute-bound, and a 2:4 weight can only beat a dense GEMM there if
bringing x to the kept values costs less than the dot product it saves. A dense GEMM spends two ``vdpbf16ps``
per 32 kept values (64 columns, half of them zeros); a sparse one spends one ``vdpbf16ps`` plus whatever lines x
up with the kept values. This times those inner loops alone, on L1-resident data, with 16 independent
accumulators (so latency is hidden), and reports nanoseconds per 32 kept values and the ratio to the dense
sequence (< 1: that sparse sequence could beat a dense GEMM running at the same efficiency):

- ``dense``: two ``vdpbf16ps`` with a 32-bit broadcast load of W per dot product (a dense GEMM's inner loop);
- ``gather (vpermt2w)``: load x, ``vpermt2w`` x's 64 columns into the kept positions, one ``vdpbf16ps`` (the
  GEMV's loop);
- ``pick (vpshufb)``: x's columns already replicated per 128-bit lane, ``vpshufb`` picks the two kept columns per
  lane, one ``vdpbf16ps``; ``+ vbroadcasti64x4`` does the replication with a 256-bit broadcast;
- ``row lanes (vpbroadcastq + vpshufb)``: the row lanes' loop (sparse24.cpp): a token's group of 4 columns
  (8 bytes) broadcast to every qword, ``vpshufb`` picks each row's two kept columns, one ``vdpbf16ps`` for 16
  rows;
- ``dot product only``: the floor, one ``vdpbf16ps`` and a load.

Needs g++ and a CPU with AVX512_BF16 (compiled with ``-march=native``). Writes ``cpu_instructions.json`` and
``cpu_instructions.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bawa_vllm.kernels import cpu  # noqa: E402

SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
alignas(64) uint8_t buf[16384];
// One pass: 16 accumulators, one step each; MODE picks the sequence a step costs. Every step is worth 32 kept
// values (dense: 64 columns, so two dot products).
template <int MODE>
__attribute__((noinline)) float run(long iters) {
  __m512 a[16];
  for (int t = 0; t < 16; ++t) a[t] = _mm512_setzero_ps();
  __m512i w = _mm512_set1_epi32(0x3f803f80), ix = _mm512_set1_epi32(0x03020100);
  for (long i = 0; i < iters; ++i) {
    const uint8_t* p = buf + (i & 15) * 512;
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) {
      if (MODE == 0) {  // dense: W broadcast from memory, x in a register, two dot products
        const __m512i w0 = _mm512_set1_epi32(*(const int*)(p + 8 * t)), w1 = _mm512_set1_epi32(*(const int*)(p + 8 * t + 4));
        a[t] = _mm512_dpbf16_ps(a[t], (__m512bh)w0, (__m512bh)ix);
        a[t] = _mm512_dpbf16_ps(a[t], (__m512bh)w1, (__m512bh)w);
      } else {
        __m512i xb;
        if (MODE == 1) xb = _mm512_permutex2var_epi16(_mm512_loadu_si512(p + 32 * t), ix, w);
        if (MODE == 2) xb = _mm512_shuffle_epi8(_mm512_loadu_si512(p + 32 * t), ix);
        if (MODE == 3) xb = _mm512_shuffle_epi8(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(p + 32 * t))), ix);
        if (MODE == 4) xb = _mm512_loadu_si512(p + 32 * t);
        if (MODE == 5) xb = _mm512_shuffle_epi8(_mm512_set1_epi64(*(const long long*)(p + 8 * t)), ix);
        a[t] = _mm512_dpbf16_ps(a[t], (__m512bh)w, (__m512bh)xb);
      }
    }
    asm volatile("" : "+v"(ix), "+v"(w));
  }
  float s = 0;
  for (int t = 0; t < 16; ++t) s += _mm512_reduce_add_ps(a[t]);
  return s;
}
template <int MODE> double ns_per_step(long iters) {
  run<MODE>(iters / 10);
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    volatile float s = run<MODE>(iters);
    (void)s;
    const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    if (ns < best) best = ns;
  }
  return best / (iters * 16.0);
}
int main() {
  const long iters = 4000000;
  std::printf("%.4f %.4f %.4f %.4f %.4f %.4f\n", ns_per_step<0>(iters), ns_per_step<1>(iters), ns_per_step<2>(iters),
              ns_per_step<3>(iters), ns_per_step<4>(iters), ns_per_step<5>(iters));
}
"""

NAMES = ["dense", "gather (vpermt2w)", "pick (vpshufb)", "pick (vpshufb) + vbroadcasti64x4", "dot product only",
         "row lanes (vpbroadcastq + vpshufb)"]


def measure() -> dict[str, float]:
    """ns per 32 kept values for each sequence (best of 5 passes), compiled and run here."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise SystemExit("cpu_instructions: needs g++ on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "seq.cpp", Path(tmp) / "seq"
        src.write_text(SOURCE)
        subprocess.run([compiler, "-O2", "-march=native", "-o", str(exe), str(src)], check=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(NAMES, map(float, out)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu-instructions"))
    args = ap.parse_args(argv)
    if "avx512_bf16" not in cpu._cpu_flags():
        raise SystemExit("cpu_instructions: this CPU has no AVX512_BF16")
    ns = measure()
    rows = [{"sequence": name, "ns_per_32_kept": v, "vs_dense": v / ns["dense"]} for name, v in ns.items()]
    for r in rows:
        print(f"{r['sequence']:34s} {r['ns_per_32_kept']:.3f} ns per 32 kept values, {r['vs_dense']:.2f}x dense's")
    args.out.mkdir(parents=True, exist_ok=True)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    (args.out / "cpu_instructions.json").write_text(json.dumps({"cpu": model, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh([r["sequence"] for r in rows], [r["vs_dense"] for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("time per 32 kept values / dense's (< 1: could beat dense)")
    ax.set_title(model, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "cpu_instructions.png", dpi=120)
    print(f"wrote {args.out}/cpu_instructions.json and .png")


if __name__ == "__main__":
    main()
