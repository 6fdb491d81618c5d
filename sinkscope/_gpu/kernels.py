"""Triton kernels of the GPU row pass (imported only where Triton is installed).

* :func:`stats_kernel`: one layer's statistics from its queries, keys and each row's log-sum-exp. It recomputes
  Q K^T tile by tile on tensor cores (fp32 accumulation) and, with ``p = exp(s - lse)`` exact, keeps per head
  and key the sum of ``p * s`` (the entropy is ``lse - sum(p s)``), the column sums of the distant rows
  (received mass) and of the first K keys, and the pooled map. No softmax pass and no T x T tensor: the LSE
  makes every probability one exponential. Each program owns a block of keys and runs down the rows, so
  every statistic is a column sum kept in registers: summing a tile's columns across warps and adding them
  with atomics per tile cost 7x the rest (measured on an H200).
* :func:`local_kernel`: each row's mass on its last few keys (the local mass of streaming heads).
* :func:`pool_kernel`: the pooled map's cells from those column sums (a sum over each key bin).
* :func:`forward_kernel`: attention output and LSE (online softmax) for what no torch backend returns an LSE
  for: soft-capped logits, sliding windows without flash attention, float32 without efficient attention.

The statistics and forward kernels take one sequence (batch of one), heads grouped over key/value heads
(GQA: query head h reads key head h // group), causal attention with an optional sliding window (key j visible
from row q when q - window < j <= q).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    """``a @ b^T`` in fp32 (IEEE products when ``DOT_F32``, else tensor cores on the inputs' dtype)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    return tl.dot(a, tl.trans(b))


@triton.jit
def _cap(s, softcap):
    """``softcap * tanh(s / softcap)`` as ``softcap * (1 - 2 / (exp(2 s / softcap) + 1))``: finite for every s
    (exp overflows to inf and gives 1)."""
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))


@triton.jit
def _product(a, b, scale, softcap, DOT_F32: tl.constexpr, SOFTCAP: tl.constexpr):
    """``a @ b^T`` in fp32, scaled and soft-capped: a tile of scores (rows of ``a`` against rows of ``b``)."""
    s = _dot(a, b, DOT_F32) * scale
    if SOFTCAP:
        s = _cap(s, softcap)
    return s


@triton.jit
def _scores(q, k_ptrs, cols, T, scale, softcap, DOT_F32: tl.constexpr, SOFTCAP: tl.constexpr,
            D_MASK: tl.constexpr, d_ok):
    """One tile of scores ``[rows, keys]`` of the forward: the keys at ``k_ptrs`` loaded (zero past T)."""
    if D_MASK:
        k = tl.load(k_ptrs, mask=(cols[:, None] < T) & d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=cols[:, None] < T, other=0.0)
    return _product(q, k, scale, softcap, DOT_F32, SOFTCAP)


@triton.jit
def _flush(col, rb, cols, h, T, NB, POOL, done):
    """Store the key block's column sums ``col`` of query bin ``rb`` where ``done`` (the bin is complete): the
    program owns these columns and finishes each bin once, so a plain store, predicated rather than branched
    (a branch in the loop would stop Triton from pipelining its loads)."""
    tl.store(POOL + (h * NB + rb) * T + cols, col, mask=(cols < T) & done)


@triton.jit
def _stats_tile(k, m0, n0, cols, h, T, Q, LSE, TFIRST, TLAST, EDGES, sq_h, sq_t, dims, d_ok, scale, scale2, softcap,
                WINDOW, K_MAX, LOCAL, recv, ent, first, cur, c, POOL, NB, BQ: tl.constexpr, MASKED: tl.constexpr,
                DOT_F32: tl.constexpr, SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, BINS: tl.constexpr,
                QB: tl.constexpr, D_MASK: tl.constexpr):
    """Query rows ``m0 .. m0 + BQ`` against the program's keys: scores ``[keys, rows]``, so that every sum over
    rows (a column sum of the attention map) stays inside a warp, and nothing is reduced across warps per tile.

    Few instructions per score, since the exponential unit and the tensor cores are as fast as each other
    here and the issue slots are the next limit: without a soft-cap the scale joins the exponent's multiply
    (``scale2`` = scale * log2 e) and the entropy's sum takes the unscaled product (scaled once at the end),
    and a tile's later query bins are sums weighted by 0/1 per row (a fused multiply-add, not a select and
    an add)."""
    rows = m0 + tl.arange(0, BQ)
    if D_MASK:
        q = tl.load(Q + h * sq_h + rows[:, None] * sq_t + dims[None, :], mask=(rows[:, None] < T) & d_ok[None, :],
                    other=0.0)
    else:
        q = tl.load(Q + h * sq_h + rows[:, None] * sq_t + dims[None, :], mask=rows[:, None] < T, other=0.0)
    s = _dot(k, q, DOT_F32)
    lse2 = tl.load(LSE + h * T + rows, mask=rows < T, other=0.0) * 1.4426950408889634
    if SOFTCAP:
        s = _cap(s * scale, softcap)
        p = tl.exp2(s * 1.4426950408889634 - lse2[None, :])
    else:
        p = tl.exp2(s * scale2 - lse2[None, :])
    if MASKED:
        valid = (rows[None, :] >= cols[:, None]) & (rows[None, :] < T)
        if HAS_WINDOW:
            valid = valid & (rows[None, :] - cols[:, None] < WINDOW)
        p = tl.where(valid, p, 0.0)
        counted = rows[None, :] >= K_MAX
        ent += tl.sum(tl.where(counted, p * s, 0.0), axis=1)
        recv += tl.sum(tl.where(counted & (rows[None, :] - cols[:, None] >= LOCAL), p, 0.0), axis=1)
        first += tl.sum(tl.where(counted, p, 0.0), axis=1)  # (kept by the programs of keys < K only)
        colsum = tl.sum(p, axis=1)
    else:
        ent += tl.sum(p * s, axis=1)
        colsum = tl.sum(p, axis=1)
        recv += colsum
        first += colsum
    if BINS:
        # The tile's first and last query bins come from a table made on the host (a reduction over the tile's
        # rows here cost more than the rest of the bins' work).
        f = tl.load(TFIRST + m0 // BQ)
        last = tl.load(TLAST + m0 // BQ)
        zero = cols * 0
        new_bin = zero + f != c
        _flush(cur, c, cols, h, T, NB, POOL, new_bin)  # the tile starts a later bin: cur's is complete
        cur = tl.where(new_bin, 0.0, cur)
        if f == last:  # the tile lies in one bin (most tiles of wide bins): no per-score work
            cur = cur + colsum
        else:
            # Branch-free inside: the sums of the bins after the first (QB - 1 of them) are formed whether or
            # not the tile reaches them (they are zero then), and stores are predicated.
            rest = tl.zeros_like(cur)
            tail = tl.zeros_like(cur)
            for j in tl.static_range(1, QB):
                lo = tl.load(EDGES + tl.minimum(f + j, NB))
                hi = tl.load(EDGES + tl.minimum(f + j + 1, NB))
                part = tl.sum(p * ((rows >= lo) & (rows < hi)).to(tl.float32)[None, :], axis=1)
                rest += part
                _flush(part, f + j, cols, h, T, NB, POOL, zero + f + j < last)
                tail = tl.where(zero + f + j == last, part, tail)
            _flush(colsum - rest + cur, f, cols, h, T, NB, POOL, zero + f < last)
            cur = tail
        c = last
    return recv, ent, first, cur, c


@triton.jit
def stats_kernel(Q, Kt, LSE, ENT, RECV, FIRST, POOL, TFIRST, TLAST, EDGES,
                 T, NB, GROUP, scale, softcap, WINDOW, K_MAX, LOCAL,
                 sq_h, sq_t, sk_h, sk_t,
                 D: tl.constexpr, DP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                 DOT_F32: tl.constexpr, SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, BINS: tl.constexpr,
                 QB: tl.constexpr):
    """Grid ``(cdiv(T, BK), heads)``: each program owns ``BK`` keys of one head and runs down the query rows that
    see them. ``Q`` ``[heads, T, D]`` and ``Kt`` ``[kv heads, T, D]`` by strides (last dim contiguous); ``LSE``
    ``[heads, T]`` fp32, natural log, over every outcome of the row's softmax (keys and a learned sink).

    Writes, per head and key j: ``ENT[h, j]`` = sum over rows q >= K of p s, ``RECV[h, j]`` = sum of p over rows
    q >= max(K, j + LOCAL), ``FIRST[h, j]`` (j < K) = sum of p over rows q >= K; with ``BINS``, ``POOL[h, a, j]``
    = the sum of p over the rows of query bin a (``TFIRST``/``TLAST``: the first and last bin of each tile of ``BQ``
    rows; ``EDGES``: the bins' edges; ``QB``: the most bins one
    tile of rows spans), summed over key bins afterwards."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # 64-bit head offsets: heads x T x D passes 2**31 on long prompts
    hk = h // GROUP
    n0 = pid * BK
    scale2 = scale * 1.4426950408889634
    cols = n0 + tl.arange(0, BK)
    dims = tl.arange(0, DP)
    d_ok = dims < D
    D_MASK: tl.constexpr = DP != D
    k_mask = (cols[:, None] < T) & d_ok[None, :] if D_MASK else cols[:, None] < T
    k = tl.load(Kt + hk * sk_h + cols[:, None] * sk_t + dims[None, :], mask=k_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
    start = n0 // BQ * BQ
    end = T
    if HAS_WINDOW:
        end = tl.minimum(T, n0 + BK - 1 + WINDOW)
    # Rows [a, b) are interior: every (key, row) pair visible, distant (q - j >= LOCAL) and counted (q >= K),
    # so they need no masks. The rest ([start, a): the diagonal, [b, end): the window's edge and the last
    # partial tile) are masked.
    a = (tl.maximum(n0 + BK - 1 + LOCAL, K_MAX) + BQ - 1) // BQ * BQ
    a = tl.minimum(tl.maximum(a, start), end)
    b = T // BQ * BQ
    if HAS_WINDOW:
        b = tl.minimum(b, (n0 + WINDOW) // BQ * BQ)
    b = tl.maximum(b, a)
    recv = tl.zeros([BK], dtype=tl.float32)
    ent = tl.zeros([BK], dtype=tl.float32)
    first = tl.zeros([BK], dtype=tl.float32)
    cur = tl.zeros([BK], dtype=tl.float32)
    c = 0
    if BINS:
        c = tl.load(TFIRST + start // BQ)
    for m0 in range(start, a, BQ):
        recv, ent, first, cur, c = _stats_tile(
            k, m0, n0, cols, h, T, Q, LSE, TFIRST, TLAST, EDGES, sq_h, sq_t, dims, d_ok, scale, scale2, softcap,
            WINDOW, K_MAX, LOCAL,
            recv, ent, first, cur, c, POOL, NB, BQ, True, DOT_F32, SOFTCAP, HAS_WINDOW, BINS, QB,
            D_MASK)
    for m0 in range(a, b, BQ):
        recv, ent, first, cur, c = _stats_tile(
            k, m0, n0, cols, h, T, Q, LSE, TFIRST, TLAST, EDGES, sq_h, sq_t, dims, d_ok, scale, scale2, softcap,
            WINDOW, K_MAX, LOCAL,
            recv, ent, first, cur, c, POOL, NB, BQ, False, DOT_F32, SOFTCAP, HAS_WINDOW, BINS, QB,
            D_MASK)
    for m0 in range(b, end, BQ):
        recv, ent, first, cur, c = _stats_tile(
            k, m0, n0, cols, h, T, Q, LSE, TFIRST, TLAST, EDGES, sq_h, sq_t, dims, d_ok, scale, scale2, softcap,
            WINDOW, K_MAX, LOCAL,
            recv, ent, first, cur, c, POOL, NB, BQ, True, DOT_F32, SOFTCAP, HAS_WINDOW, BINS, QB,
            D_MASK)
    if BINS:
        _flush(cur, c, cols, h, T, NB, POOL, cols >= 0)
    tl.store(RECV + h * T + cols, recv, mask=cols < T)
    if not SOFTCAP:  # the sum took unscaled products
        ent = ent * scale
    tl.store(ENT + h * T + cols, ent, mask=cols < T)
    if n0 < K_MAX:
        tl.store(FIRST + h * K_MAX + cols, first, mask=cols < K_MAX)


@triton.jit
def local_kernel(Q, Kt, LSE, NEAR, T, GROUP, scale, softcap, WINDOW, K_MAX, sq_h, sq_t, sk_h, sk_t,
                 D: tl.constexpr, DP: tl.constexpr, BQ: tl.constexpr, LOCAL: tl.constexpr, DOT_F32: tl.constexpr,
                 SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Grid ``(cdiv(T, BQ), heads)``: ``NEAR[h, q]`` = the probability mass of row q >= K on its last ``LOCAL``
    keys from K on (max(K, q - LOCAL + 1) <= j <= q), from each score recomputed as a dot product and the row's
    LSE. A kernel of its own: a sum kept in the statistics kernel's loops cost it 30 % (measured on an H200),
    while this is T x LOCAL x D work per head."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    hk = h // GROUP
    rows = pid * BQ + tl.arange(0, BQ)
    dims = tl.arange(0, DP)
    d_ok = dims < D
    q = tl.load(Q + h * sq_h + rows[:, None] * sq_t + dims[None, :], mask=(rows[:, None] < T) & d_ok[None, :],
                other=0.0).to(tl.float32)
    lse = tl.load(LSE + h * T + rows, mask=rows < T, other=0.0)
    total = tl.zeros([BQ], dtype=tl.float32)
    for back in tl.static_range(LOCAL):
        cols = rows - back
        ok = (rows < T) & (rows >= K_MAX) & (cols >= K_MAX)
        if HAS_WINDOW:
            ok = ok & (rows * 0 + back < WINDOW)  # (a tensor, not a scalar bool: the interpreter's masks need one)
        k = tl.load(Kt + hk * sk_h + cols[:, None] * sk_t + dims[None, :], mask=ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        s = tl.sum(q * k, axis=1) * scale
        if SOFTCAP:
            s = _cap(s, softcap)
        total += tl.where(ok, tl.exp(s - lse), 0.0)
    tl.store(NEAR + h * T + rows, total, mask=rows < T)


@triton.jit
def pool_kernel(POOL, CELLS, EDGES, T, NB, R, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(cdiv(R, ROWS), bins)`` over the ``R = heads * bins`` rows of ``POOL`` (column sums per query bin,
    ``[heads, bins, T]``): ``CELLS[h, a, b]`` = the sum of ``POOL[h, a, j]`` over the keys j of bin b (``EDGES``:
    the bins' ``NB + 1`` edges, shared by queries and keys). A query bin sees no key past its last row, so the
    cells above the diagonal are zero without reading anything. ``ROWS`` rows per program: a few on a GPU,
    all of them under the interpreter (where each program costs milliseconds)."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    b = tl.program_id(1)
    ok = r < R
    lo = tl.load(EDGES + b)
    hi_r = tl.minimum(tl.load(EDGES + b + 1), tl.load(EDGES + r % NB + 1, mask=ok, other=0))
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for j0 in range(lo, tl.max(hi_r, axis=0), BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        acc += tl.load(POOL + r[:, None] * T + cols[None, :], mask=ok[:, None] & (cols[None, :] < hi_r[:, None]),
                       other=0.0)
    tl.store(CELLS + r * NB + b, tl.sum(acc, axis=1), mask=ok)


@triton.jit
def forward_kernel(Q, Kt, V, Out, LSE, T, GROUP, scale, softcap, WINDOW,
                   sq_h, sq_t, sk_h, sk_t, sv_h, sv_t, so_t, so_h,
                   D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, DOT_F32: tl.constexpr, SOFTCAP: tl.constexpr,
                   HAS_WINDOW: tl.constexpr):
    """Grid ``(cdiv(T, BM), heads)``: ``Out[q, h]`` (``[T, heads, DV]`` by strides, the model's dtype) and
    ``LSE[h, q]`` (fp32, natural log) of causal attention with an optional window and soft-cap."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    hk = h // GROUP
    m0 = pid_m * BM
    rows = m0 + tl.arange(0, BM)
    dims = tl.arange(0, DP)
    d_ok = dims < D
    D_MASK: tl.constexpr = DP != D
    dv = tl.arange(0, DVP)
    q = tl.load(Q + h * sq_h + rows[:, None] * sq_t + dims[None, :], mask=(rows[:, None] < T) & d_ok[None, :],
                other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, DVP], dtype=tl.float32)
    hi = tl.minimum(T, m0 + BM)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(m0 - WINDOW + 1, 0) // BN * BN
    for n0 in range(lo, hi, BN):
        cols = n0 + tl.arange(0, BN)
        s = _scores(q, Kt + hk * sk_h + cols[:, None] * sk_t + dims[None, :], cols, T, scale, softcap, DOT_F32,
                    SOFTCAP, D_MASK, d_ok)
        valid = (cols[None, :] <= rows[:, None]) & (cols[None, :] < T)
        if HAS_WINDOW:
            valid = valid & (cols[None, :] > rows[:, None] - WINDOW)
        s2 = tl.where(valid, s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past T see no key
        p = tl.exp2(s2 - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + hk * sv_h + cols[:, None] * sv_t + dv[None, :], mask=(cols[:, None] < T) & (dv[None, :] < DV),
                    other=0.0)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    # (64-bit rows: the output is [T, heads, D_v], so T x heads x D_v passes 2**31 on long prompts)
    tl.store(Out + rows[:, None].to(tl.int64) * so_t + h * so_h + dv[None, :], out.to(Out.dtype.element_ty),
             mask=(rows[:, None] < T) & (dv[None, :] < DV))
    tl.store(LSE + h * T + rows, (m_i + tl.log2(l_safe)) / 1.4426950408889634, mask=rows < T)
