"""The flops and bytes behind the TFLOP/s and GB/s columns, and the floor factor.

x [M, K], W [N, K], A [r, K], B [N, r]; elt = bytes per element of the benchmark dtype.
"norm" is the variant with the output norm and the residual add (gamma [N], residual [M, N]).

forward
    flops = 2MKN + 2Mr(K+N)                         base GEMM + shrink x A^T + expand s B^T
            (+ 8MN with the norm and residual: mean, variance, normalise, scale, add)
    bytes = elt * (MK + NK + r(K+N) + MN)           read x, W, A, B; write y
            (+ elt * (N + MN) with the norm: read gamma and the residual)
backward (W frozen, as in adapter training: grads of x, A, B [, gamma, residual])
    flops = 2MKN + 4Mr(K+N)                         dx = dy W + (dy B) A, dA = (dy B)^T x, dB = dy^T s
            (+ 8MN with the norm)
    bytes = elt * (MN + MK + NK + 2r(K+N) + Mr + MK) read dy, x, W, A, B, s; write dx, dA, dB
            (+ elt * (MN + 2N) with the norm: read y_pre and gamma, write dgamma; the residual's
            gradient is dy itself)
dense (F.linear alone): flops 2MKN (4MKN fwd+bwd); bytes elt * (MK + NK + MN) (+ MN + NK + MK).

Every implementation of the op (ours, unfused) is credited with the op's flops and minimal bytes,
so their GB/s compare directly (the unfused composition really moves more: its intermediates
round-trip through memory). The floor is the dense time scaled by the op's extra work,
op flops / dense flops without the norm:
    forward   1 + r(K+N)/(KN)
    fwd+bwd   1 + 1.5 r(K+N)/(KN)
No kernel can beat it: it is the dense GEMM's speed applied to the op's matmul work.
"""

from __future__ import annotations

from .shapes import Shape


def floor_factor(s: Shape, mode: str) -> float:
    extra = s.r * (s.k + s.n) / (s.k * s.n)
    return 1.0 + (1.5 * extra if mode == "fwd+bwd" else extra)


def op_flops(s: Shape, norm: bool, mode: str) -> float:
    m, k, n, r = s.m, s.k, s.n, s.r
    fwd = 2 * m * k * n + 2 * m * r * (k + n) + (8 * m * n if norm else 0)
    if mode == "fwd":
        return float(fwd)
    return float(fwd + 2 * m * k * n + 4 * m * r * (k + n) + (8 * m * n if norm else 0))


def op_bytes(s: Shape, norm: bool, mode: str, elt: int) -> float:
    m, k, n, r = s.m, s.k, s.n, s.r
    fwd = m * k + n * k + r * (k + n) + m * n + ((n + m * n) if norm else 0)
    if mode == "fwd":
        return float(elt * fwd)
    bwd = m * n + m * k + n * k + 2 * r * (k + n) + m * r + m * k + ((m * n + 2 * n) if norm else 0)
    return float(elt * (fwd + bwd))


def dense_flops(s: Shape, mode: str) -> float:
    return float((2 if mode == "fwd" else 4) * s.m * s.k * s.n)


def dense_bytes(s: Shape, mode: str, elt: int) -> float:
    fwd = s.m * s.k + s.n * s.k + s.m * s.n
    return float(elt * (fwd if mode == "fwd" else 2 * fwd))
