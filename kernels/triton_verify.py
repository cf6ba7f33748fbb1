"""Fused Triton kernels for verifying speculative-decoding drafts.

Same contract as :func:`kernels.reference.verify_drafts`; callers go through the
public entry point :func:`kernels.verify_drafts`, which picks this backend for
CUDA tensors. On a machine without a GPU the kernels run in Triton's interpreter
when ``TRITON_INTERPRET=1`` is set before ``triton`` is first imported, which is
how the tests exercise the kernel source on CPU tensors.

Shapes used throughout (``B`` rows, ``K`` draft slots, ``V`` vocabulary)::

    draft_tokens  [B, K]      int32/int64
    draft_lens    [B]         int32/int64, 0 <= len <= K
    target_probs  [B, K+1, V] float16/bfloat16/float32/float64 ("p")
    draft_probs   [B, K, V]   same dtype as target_probs ("q"); None for greedy, and for
                              deterministic drafts (a point mass at each draft, never materialised)
    tokens        [B, K+1]    int64 output, padded with PAD (-1)
    num_accepted  [B]         int64 output

Greedy (two launches)
    1. ``_greedy_argmax_kernel``, grid (B, K+1, S): program (b, i, s) streams the
       s-th chunk of ``p[b, i, :]`` and keeps a per-lane running max, so the hot
       loop has no cross-lane reduction. It writes one (max, first index) pair.
    2. ``_greedy_finalize_kernel``, grid (B,): folds the S partials of every
       position (ties go to the lowest index, as ``torch.argmax`` does), finds the
       first position whose draft differs from the target argmax, writes the row.

Sampling (one launch, two when the vocabulary is split)
    1. ``_sample_kernel``, grid (B, S): every program first redoes the acceptance
       test for its row. That is K gathered loads, cheap next to the stream, and it
       lets the program know which position ``n`` (first rejection, or the bonus
       slot) to sample from without a launch in between. It then streams chunk s of
       ``p[b, n, :]`` (and ``q[b, n, :]`` after a rejection) once and draws the
       recovered/bonus token with the exponential race
       ``argmax_v residual_v / E_v, E_v ~ Exp(1)``, which samples from
       ``normalize(residual)`` without normalising, without a cumulative sum and
       without ever writing the residual distribution to global memory. It keeps a
       second race on ``p`` itself, fed by the same noise, for the reference's
       fallback when the residual is all zero.
    2. ``_sample_finalize_kernel``, grid (B,), only when S > 1: folds the partials.

Random numbers. The launcher draws one 63-bit seed per row from the caller's
``torch.Generator`` (or torch's default RNG); inside the kernel Philox
(``tl.rand``/``tl.randint4x``) turns (seed, counter) into the uniforms for the
acceptance test (counters 0..K-1) and the noise of column v (counter v // 4 in a
second counter word, lane v % 4). The noise of a column therefore depends only on
the row's seed and the column, not on block size or split count, so results are
reproducible across launch configurations, and a row's result depends only on
its own seed and inputs.

Validation. Shapes, dtypes and devices are checked on the host without touching
the data. The value checks of :func:`kernels.reference.check_inputs` (lengths in
[0, K], draft ids in [0, V), no NaN in p or q) are fused into the kernels, which
raise a device-side flag; the launcher reads the flag once after the launch and,
if it is set, calls ``check_inputs`` to raise the reference's own error message.
With ``nan_check="full"`` (the default) every element of p and q is checked for
NaN, exactly like the reference: the kernels then read p and q once in full. With
``nan_check="touched"`` only the elements the maths needs are read and checked,
which for sampling is about 2 of the 2K+1 vocabulary rows per request. Reading
the flag is the launcher's one host synchronisation (so a call cannot be captured
in a CUDA graph as it stands).
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from kernels.reference import PAD, VerificationResult, check_inputs

# The kernels write PAD as a literal; keep them in step with the reference.
assert PAD == -1

__all__ = ["verify_drafts_triton", "INTERPRETED"]

# Globals read inside @triton.jit functions must be constexpr.
_INT32_MAX = tl.constexpr(2**31 - 1)


# ----------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------


@triton.jit
def _exponential_noise(seed, start, BLOCK_V: tl.constexpr):
    """Exp(1) noise for columns ``start + [0, BLOCK_V)`` of one row -> [BLOCK_V] float32.

    ``start`` must be a multiple of 4. One Philox call yields four 32-bit words, so
    counter ``c`` (in the second counter word, to keep it apart from the acceptance
    uniforms) feeds columns 4c .. 4c+3: a quarter of the integer work of one call
    per column, which matters because the sampler must stay memory-bound.
    """
    groups = start // 4 + tl.arange(0, BLOCK_V // 4)
    counters = groups.to(tl.int64) + (1 << 32)
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    # Interleave so that column 4c + j gets word j of counter c.
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_V,))
    # u in (0, 1]: the +0.5 keeps it off 0, so E below is never 0 (p / 0 would be
    # inf, and 0 / 0 NaN). u may round up to 1, giving E = inf and a score of 0,
    # a tail event of probability ~2**-25 that costs nothing in accuracy.
    u = (bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 2**-32
    # E = -log(1 - u). The race is decided by the smallest E, i.e. the smallest u,
    # where 1 - u would round away the low bits in float32; there the series of
    # -log1p(-u) keeps full relative precision (error < 2e-10 for u < 1/64).
    series = u * (1.0 + u * (0.5 + u * (0.3333333333333333 + u * (0.25 + u * 0.2))))
    return tl.where(u < 0.015625, series, -tl.log(1.0 - u))


@triton.jit
def _write_row(
    tokens_ptr,
    num_acc_ptr,
    draft_tok_ptr,
    stride_dt_b,
    stride_dt_k,
    b,
    n,
    next_token,
    K,
    BLOCK_K1: tl.constexpr,
):
    """Write row b: ``n`` accepted drafts, then ``next_token``, then PAD; and num_accepted."""
    b64 = b.to(tl.int64)
    pos = tl.arange(0, BLOCK_K1)
    drafts = tl.load(draft_tok_ptr + b64 * stride_dt_b + pos * stride_dt_k, mask=pos < K, other=0)
    out = tl.where(pos < n, drafts.to(tl.int64), tl.where(pos == n, next_token.to(tl.int64), -1))
    tl.store(tokens_ptr + b64 * (K + 1) + pos, out, mask=pos < K + 1)
    tl.store(num_acc_ptr + b, n.to(tl.int64))


@triton.jit
def _load_len(lens_ptr, b, K):
    """Row b's draft length clamped to [0, K] (so no load can go out of bounds), and
    whether it was out of range (reported through the error flag)."""
    length = tl.load(lens_ptr + b)
    bad = (length < 0) | (length > K)
    return tl.minimum(tl.maximum(length, 0), K).to(tl.int32), bad


# ----------------------------------------------------------------------------
# Greedy
# ----------------------------------------------------------------------------


@triton.jit
def _greedy_argmax_kernel(
    part_val_ptr,  # [B, K+1, S] ACC_DTYPE out: max of the chunk
    part_idx_ptr,  # [B, K+1, S] int32 out: first index of that max
    err_ptr,  # [1] int32, set to 1 on NaN
    lens_ptr,  # [B]
    p_ptr,  # [B, K+1, V]
    stride_p_b,
    stride_p_k,
    stride_p_v,
    K,
    V,
    CHUNK,  # columns per split, a multiple of BLOCK_V
    NUM_SPLITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # float32, or float64 so that fp64 ties are not created by rounding
    FULL_NAN_CHECK: tl.constexpr,
):
    b = tl.program_id(0)
    pos = tl.program_id(1)
    s = tl.program_id(2)
    length, _ = _load_len(lens_ptr, b, K)  # the finalize kernel reports bad lengths
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, V)
    # Positions past the row's length are never looked at; skip their bytes unless
    # every element must be checked for NaN.
    if not FULL_NAN_CHECK:
        end = tl.where(pos <= length, end, start)
    row = p_ptr + b.to(tl.int64) * stride_p_b + pos.to(tl.int64) * stride_p_k
    lanes = tl.arange(0, BLOCK_V)
    best = tl.full((BLOCK_V,), float("-inf"), ACC_DTYPE)
    # A lane that never beats -inf keeps its first column, so an all -inf row still
    # reports index `start`, as torch.argmax reports 0.
    best_idx = start + lanes
    has_nan = tl.zeros((BLOCK_V,), tl.int1)
    for off in range(start, end, BLOCK_V):
        cols = off + lanes
        x = tl.load(row + cols.to(tl.int64) * stride_p_v, mask=cols < end, other=float("-inf"))
        x = x.to(ACC_DTYPE)
        has_nan |= x != x
        # Strict '>' keeps the earliest column of each lane on ties.
        better = x > best
        best = tl.where(better, x, best)
        best_idx = tl.where(better, cols, best_idx)
    chunk_max = tl.max(best, axis=0)
    # Among lanes holding the max, the lowest column is the first occurrence.
    chunk_idx = tl.min(tl.where(best == chunk_max, best_idx, _INT32_MAX), axis=0)
    out = (b * (K + 1) + pos) * NUM_SPLITS + s
    tl.store(part_val_ptr + out, chunk_max)
    tl.store(part_idx_ptr + out, chunk_idx)
    tl.store(err_ptr, 1, mask=tl.max(has_nan.to(tl.int32), axis=0) > 0)


@triton.jit
def _greedy_finalize_kernel(
    tokens_ptr,  # [B, K+1] int64 out
    num_acc_ptr,  # [B] int64 out
    err_ptr,  # [1] int32, set to 1 on a bad length or draft id
    part_val_ptr,  # [B, K+1, S]
    part_idx_ptr,  # [B, K+1, S]
    lens_ptr,
    draft_tok_ptr,
    stride_dt_b,
    stride_dt_k,
    K,
    V,
    NUM_SPLITS: tl.constexpr,
    BLOCK_K1: tl.constexpr,  # next power of two >= K+1
    BLOCK_S: tl.constexpr,  # next power of two >= NUM_SPLITS
):
    b = tl.program_id(0)
    length, bad = _load_len(lens_ptr, b, K)
    pos = tl.arange(0, BLOCK_K1)
    drafts = tl.load(draft_tok_ptr + b.to(tl.int64) * stride_dt_b + pos * stride_dt_k, mask=pos < K, other=0)
    # Padding past a row's length must be a valid id too (reference contract).
    bad |= tl.max(((pos < K) & ((drafts < 0) | (drafts >= V))).to(tl.int32), axis=0) > 0

    splits = tl.arange(0, BLOCK_S)
    # Partials past the row's length may not have been written: never read them.
    valid = (pos <= length)[:, None] & (splits < NUM_SPLITS)[None, :]
    offs = (b * (K + 1) + pos)[:, None] * NUM_SPLITS + splits[None, :]
    vals = tl.load(part_val_ptr + offs, mask=valid, other=float("-inf"))
    idxs = tl.load(part_idx_ptr + offs, mask=valid, other=_INT32_MAX)
    row_max = tl.max(vals, axis=1)
    target_ids = tl.min(tl.where(vals == row_max[:, None], idxs, _INT32_MAX), axis=1)  # [BLOCK_K1]

    # Position `length` always counts as a mismatch (it is the bonus slot), so the
    # first mismatch n is at most length.
    mismatch = (drafts != target_ids) | (pos >= length)
    n = tl.min(tl.where(mismatch, pos, BLOCK_K1), axis=0)
    next_token = tl.sum(tl.where(pos == n, target_ids, 0), axis=0)
    _write_row(tokens_ptr, num_acc_ptr, draft_tok_ptr, stride_dt_b, stride_dt_k, b, n, next_token, K, BLOCK_K1)
    tl.store(err_ptr, 1, mask=bad)


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------


@triton.jit
def _sample_kernel(
    tokens_ptr,  # [B, K+1] int64 out (written here when NUM_SPLITS == 1)
    num_acc_ptr,  # [B] int64 out
    part_r_val_ptr,  # [B, S] float32 out: best residual score of the chunk (NUM_SPLITS > 1)
    part_r_idx_ptr,  # [B, S] int32 out
    part_p_val_ptr,  # [B, S] float32 out: best score of the p-fallback race
    part_p_idx_ptr,  # [B, S] int32 out
    part_r_any_ptr,  # [B, S] int32 out: chunk has a positive residual
    err_ptr,  # [1] int32, set to 1 on NaN, a bad length or a bad draft id
    draft_tok_ptr,
    stride_dt_b,
    stride_dt_k,
    lens_ptr,
    p_ptr,  # [B, K+1, V]
    stride_p_b,
    stride_p_k,
    stride_p_v,
    q_ptr,  # [B, K, V]
    stride_q_b,
    stride_q_k,
    stride_q_v,
    seed_ptr,  # [B] int64 Philox seeds
    u_ptr,  # [B, K] float32 acceptance uniforms, read only with EXTERNAL_NOISE
    e_ptr,  # [B, V] float32 Exp(1) noise, read only with EXTERNAL_NOISE
    K,
    V,
    CHUNK,
    NUM_SPLITS: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next power of two >= max(K, 1)
    BLOCK_K1: tl.constexpr,  # next power of two >= K+1
    BLOCK_V: tl.constexpr,
    WIDE_DTYPE: tl.constexpr,  # float64 for float64 inputs, else float32
    FULL_NAN_CHECK: tl.constexpr,
    EXTERNAL_NOISE: tl.constexpr,  # test hook: take the random numbers from memory
    POINT_MASS: tl.constexpr,  # q is one-hot at each draft: q_ptr is never read
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    b64 = b.to(tl.int64)
    length, bad = _load_len(lens_ptr, b, K)
    seed = tl.load(seed_ptr + b)

    # ---- acceptance: accept draft i with probability min(1, p_i(x_i) / q_i(x_i))
    ks = tl.arange(0, BLOCK_K)
    tok = tl.load(draft_tok_ptr + b64 * stride_dt_b + ks * stride_dt_k, mask=ks < K, other=0)
    bad |= tl.max(((ks < K) & ((tok < 0) | (tok >= V))).to(tl.int32), axis=0) > 0
    tok = tl.minimum(tl.maximum(tok, 0), V - 1).to(tl.int64)
    in_draft = ks < length
    ks64 = ks.to(tl.int64)
    # Widen before any arithmetic or comparison: float32 is what the reference
    # compares in, and Triton's interpreter has no bfloat16 arithmetic.
    p_tok = tl.load(p_ptr + b64 * stride_p_b + ks64 * stride_p_k + tok * stride_p_v, mask=in_draft, other=0)
    p_tok = p_tok.to(tl.float32)
    if POINT_MASS:
        q_tok = tl.where(in_draft, 1.0, 0.0)
    else:
        q_tok = tl.load(q_ptr + b64 * stride_q_b + ks64 * stride_q_k + tok * stride_q_v, mask=in_draft, other=0)
        q_tok = q_tok.to(tl.float32)
    has_nan = tl.max(((p_tok != p_tok) | (q_tok != q_tok)).to(tl.int32), axis=0) > 0
    if EXTERNAL_NOISE:
        u = tl.load(u_ptr + b64 * K + ks, mask=in_draft, other=1.0)
    else:
        u = tl.rand(seed, ks)
    # u * q < p  <=>  u < p / q without dividing by a zero q; float32 like the reference.
    accepted = (u * q_tok < p_tok) & in_draft
    n = tl.minimum(tl.min(tl.where(accepted, BLOCK_K, ks), axis=0), length)
    rejected = n < length

    # ---- recovered token ~ normalize(max(0, p_n - q_n)) after a rejection, bonus ~ p_n otherwise
    n64 = n.to(tl.int64)
    x_n = tl.sum(tl.where(ks == n, tok, 0), axis=0)  # the rejected draft (point mass only)
    p_row = p_ptr + b64 * stride_p_b + n64 * stride_p_k
    q_row = q_ptr + b64 * stride_q_b + n64 * stride_q_k  # only dereferenced when rejected (n < K)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, V)
    lanes = tl.arange(0, BLOCK_V)
    r_best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    r_idx = start + lanes
    p_best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    p_idx = start + lanes
    # q is only read after a rejection; expressed as a bound so the mask stays a
    # plain block comparison.
    q_end = tl.where(rejected, end, 0)
    r_pos = tl.zeros((BLOCK_V,), tl.int1)
    nan_lanes = tl.zeros((BLOCK_V,), tl.int1)
    for off in range(start, end, BLOCK_V):
        cols = off + lanes
        live = cols < end
        cols64 = cols.to(tl.int64)
        pv = tl.load(p_row + cols64 * stride_p_v, mask=live, other=0)
        pw = pv.to(WIDE_DTYPE)
        p32 = pw.to(tl.float32)
        if POINT_MASS:
            # max(0, p - onehot(x)) is p with the rejected draft x removed.
            nan_lanes |= pw != pw
            res = tl.where(rejected & (cols == x_n), 0.0, p32)
        else:
            qv = tl.load(q_row + cols64 * stride_q_v, mask=cols < q_end, other=0)
            # The reference subtracts in the input dtype (torch computes a 16-bit
            # difference in float32 and rounds it back), clamps, then widens to float32.
            # Doing exactly that keeps the residual bit-identical to the reference.
            qw = qv.to(WIDE_DTYPE)
            nan_lanes |= (pw != pw) | (qw != qw)
            diff = (pw - qw).to(pv.dtype).to(tl.float32)
            res = tl.where(rejected, tl.maximum(diff, 0.0), p32)
        if EXTERNAL_NOISE:
            # div_rn: IEEE round-to-nearest like torch's division (a plain '/' may
            # lower to an approximate division on GPUs), so that scores match the
            # reference bit for bit when both are fed the same noise.
            e = tl.load(e_ptr + b64 * V + cols64, mask=live, other=1.0)
            r_score = tl.math.div_rn(res, e)
            p_score = tl.math.div_rn(p32, e)
        else:
            # One (approximate) reciprocal and two multiplies instead of two IEEE
            # divisions: the per-element arithmetic must stay under the memory time.
            # A last-ulp difference in a score does not bias the race.
            inv_e = 1.0 / _exponential_noise(seed, off, BLOCK_V)
            r_score = res * inv_e
            p_score = p32 * inv_e
        r_score = tl.where(live, r_score, float("-inf"))
        p_score = tl.where(live, p_score, float("-inf"))
        better = r_score > r_best
        r_best = tl.where(better, r_score, r_best)
        r_idx = tl.where(better, cols, r_idx)
        better = p_score > p_best
        p_best = tl.where(better, p_score, p_best)
        p_idx = tl.where(better, cols, p_idx)
        r_pos |= live & (res > 0)

    if FULL_NAN_CHECK:
        # Check every other row of this chunk for NaN as the reference does. The
        # rows streamed above are masked out so that no byte is read twice.
        for i in range(0, K + 1):
            row = p_ptr + b64 * stride_p_b + i * stride_p_k
            row_end = tl.where(i != n, end, 0)
            for off in range(start, end, BLOCK_V):
                cols = off + lanes
                x = tl.load(row + cols.to(tl.int64) * stride_p_v, mask=cols < row_end, other=0)
                x = x.to(WIDE_DTYPE)
                nan_lanes |= x != x
        if not POINT_MASS:
            for i in range(0, K):
                row = q_ptr + b64 * stride_q_b + i * stride_q_k
                row_end = tl.where((i != n) | (n >= length), end, 0)
                for off in range(start, end, BLOCK_V):
                    cols = off + lanes
                    x = tl.load(row + cols.to(tl.int64) * stride_q_v, mask=cols < row_end, other=0)
                    x = x.to(WIDE_DTYPE)
                    nan_lanes |= x != x
    has_nan |= tl.max(nan_lanes.to(tl.int32), axis=0) > 0
    tl.store(err_ptr, 1, mask=bad | has_nan)

    r_max = tl.max(r_best, axis=0)
    r_arg = tl.min(tl.where(r_best == r_max, r_idx, _INT32_MAX), axis=0)
    p_max = tl.max(p_best, axis=0)
    p_arg = tl.min(tl.where(p_best == p_max, p_idx, _INT32_MAX), axis=0)
    r_any = tl.max(r_pos.to(tl.int32), axis=0)
    if NUM_SPLITS == 1:
        # An all-zero residual (a rejected draft with p = q = 0 there) falls back to p.
        next_token = tl.where(r_any > 0, r_arg, p_arg)
        _write_row(tokens_ptr, num_acc_ptr, draft_tok_ptr, stride_dt_b, stride_dt_k, b, n, next_token, K, BLOCK_K1)
    else:
        out = b * NUM_SPLITS + s
        tl.store(part_r_val_ptr + out, r_max)
        tl.store(part_r_idx_ptr + out, r_arg)
        tl.store(part_p_val_ptr + out, p_max)
        tl.store(part_p_idx_ptr + out, p_arg)
        tl.store(part_r_any_ptr + out, r_any)
        tl.store(num_acc_ptr + b, n.to(tl.int64), mask=s == 0)


@triton.jit
def _sample_finalize_kernel(
    tokens_ptr,
    num_acc_ptr,  # [B] int64, written by _sample_kernel, read here
    part_r_val_ptr,
    part_r_idx_ptr,
    part_p_val_ptr,
    part_p_idx_ptr,
    part_r_any_ptr,
    draft_tok_ptr,
    stride_dt_b,
    stride_dt_k,
    K,
    NUM_SPLITS: tl.constexpr,
    BLOCK_K1: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    live = splits < NUM_SPLITS
    offs = b * NUM_SPLITS + splits
    r_val = tl.load(part_r_val_ptr + offs, mask=live, other=float("-inf"))
    r_idx = tl.load(part_r_idx_ptr + offs, mask=live, other=_INT32_MAX)
    p_val = tl.load(part_p_val_ptr + offs, mask=live, other=float("-inf"))
    p_idx = tl.load(part_p_idx_ptr + offs, mask=live, other=_INT32_MAX)
    r_any = tl.max(tl.load(part_r_any_ptr + offs, mask=live, other=0), axis=0)
    # Splits cover increasing columns, so the lowest index among equal maxima is
    # the first occurrence, as in a single pass.
    r_arg = tl.min(tl.where(r_val == tl.max(r_val, axis=0), r_idx, _INT32_MAX), axis=0)
    p_arg = tl.min(tl.where(p_val == tl.max(p_val, axis=0), p_idx, _INT32_MAX), axis=0)
    next_token = tl.where(r_any > 0, r_arg, p_arg)
    n = tl.load(num_acc_ptr + b).to(tl.int32)
    _write_row(tokens_ptr, num_acc_ptr, draft_tok_ptr, stride_dt_b, stride_dt_k, b, n, next_token, K, BLOCK_K1)


# ----------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------

#: True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1 at
#: import time), in which case they accept CPU tensors.
INTERPRETED = not isinstance(_sample_kernel, triton.runtime.JITFunction)


def _structure_ok(draft_tokens, draft_lens, target_probs, draft_probs, greedy) -> bool:
    """Shape/dtype/device checks of ``check_inputs`` that need no data (no host sync)."""
    if greedy and draft_probs is not None:
        return False
    if draft_tokens.dim() != 2 or draft_tokens.dtype not in (torch.int32, torch.int64):
        return False
    B, K = draft_tokens.shape
    if draft_lens.shape != (B,) or draft_lens.dtype not in (torch.int32, torch.int64):
        return False
    if target_probs.dim() != 3 or target_probs.shape[:2] != (B, K + 1) or not target_probs.is_floating_point():
        return False
    V = target_probs.shape[2]
    if V < 1:
        return False
    devices = {draft_tokens.device, draft_lens.device, target_probs.device}
    if draft_probs is not None:
        if draft_probs.shape != (B, K, V) or draft_probs.dtype != target_probs.dtype:
            return False
        devices.add(draft_probs.device)
    return len(devices) == 1


def _raise_invalid(draft_tokens, draft_lens, target_probs, draft_probs, greedy) -> None:
    # Let the reference phrase the error, so that every backend rejects an input
    # with the same message.
    check_inputs(draft_tokens, draft_lens, target_probs, draft_probs, greedy)
    raise ValueError("invalid verification inputs")  # unreachable unless the checks disagree


def _default_block_v(V: int) -> int:
    # 1024 columns: 4 KiB of fp32 per row per iteration, enough bytes in flight per
    # program to saturate HBM with a few programs per SM. Small vocabularies get a
    # block that fits (>= 16 so that the 4-wide noise interleave always works).
    return max(16, min(1024, triton.next_power_of_2(V)))


def _num_splits(programs_per_split: int, V: int, block_v: int, device: torch.device) -> int:
    """Split the vocabulary when there are too few rows to fill the GPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(4 * sms, max(programs_per_split, 1))
    # Keep at least 4 blocks of work per program so the stream amortises setup.
    return max(1, min(wanted, triton.cdiv(V, 4 * block_v), 256))


def verify_drafts_triton(
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    greedy: bool = False,
    nan_check: Literal["full", "touched"] = "full",
    seeds: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_v: int | None = None,
    _noise: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> VerificationResult:
    """Verify a batch of drafts with the fused Triton kernels.

    Same contract as :func:`kernels.reference.verify_drafts` (greedy results are
    identical; sampled results have the same distribution), plus keyword-only
    knobs that the public entry point leaves at their defaults:

    Args:
        greedy: argmax verification; otherwise speculative sampling against
            ``draft_probs``, or against a point mass at each draft when it is None.
        nan_check: "full" checks every element of p and q for NaN, like the
            reference (the kernels then read p and q once in full); "touched" only
            checks, and reads, the elements the result depends on.
        seeds: [B] int64 per-row Philox seeds; by default drawn from ``generator``.
            The same seed and inputs give the same row result, whatever the batch.
        num_splits: split the vocabulary across this many programs per row (default:
            enough programs to fill the GPU; 1 under the interpreter).
        block_v: columns per loop iteration, a power of two >= 16.
        _noise: test hook, (u [B, K] float32, e [B, V] float32): use these acceptance
            uniforms and Exp(1) noise instead of Philox, so that results can be
            compared bit for bit with the reference fed the same numbers.

    Returns:
        VerificationResult(tokens [B, K+1] int64 padded with -1, num_accepted [B] int64).
    """
    if not _structure_ok(draft_tokens, draft_lens, target_probs, draft_probs, greedy):
        _raise_invalid(draft_tokens, draft_lens, target_probs, draft_probs, greedy)
    if nan_check not in ("full", "touched"):
        raise ValueError(f"nan_check must be 'full' or 'touched', got {nan_check!r}")
    device = target_probs.device
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "the Triton backend needs CUDA tensors; for CPU tensors use backend='torch', or set "
            "TRITON_INTERPRET=1 before triton is first imported to run the kernels in the interpreter"
        )
    B, K = draft_tokens.shape
    V = target_probs.shape[2]
    tokens = torch.empty((B, K + 1), dtype=torch.int64, device=device)
    num_accepted = torch.empty((B,), dtype=torch.int64, device=device)
    if B == 0:
        return VerificationResult(tokens=tokens, num_accepted=num_accepted)

    block_v = block_v or _default_block_v(V)
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    full = nan_check == "full"
    draft_lens = draft_lens.contiguous()  # [B]: the kernels index it with b alone
    err = torch.zeros((1,), dtype=torch.int32, device=device)
    block_k1 = triton.next_power_of_2(K + 1)

    if greedy:
        splits = num_splits or _num_splits(B * (K + 1), V, block_v, device)
        chunk = triton.cdiv(triton.cdiv(V, splits), block_v) * block_v
        splits = triton.cdiv(V, chunk)  # no empty splits
        acc_dtype = torch.float64 if target_probs.dtype == torch.float64 else torch.float32
        part_val = torch.empty((B, K + 1, splits), dtype=acc_dtype, device=device)
        part_idx = torch.empty((B, K + 1, splits), dtype=torch.int32, device=device)
        p = target_probs
        _greedy_argmax_kernel[(B, K + 1, splits)](
            part_val, part_idx, err, draft_lens,
            p, p.stride(0), p.stride(1), p.stride(2),
            K, V, chunk,
            NUM_SPLITS=splits,
            BLOCK_V=block_v,
            ACC_DTYPE=tl.float64 if acc_dtype == torch.float64 else tl.float32,
            FULL_NAN_CHECK=full,
        )  # fmt: skip
        _greedy_finalize_kernel[(B,)](
            tokens, num_accepted, err, part_val, part_idx, draft_lens,
            draft_tokens, draft_tokens.stride(0), draft_tokens.stride(1),
            K, V,
            NUM_SPLITS=splits,
            BLOCK_K1=block_k1,
            BLOCK_S=triton.next_power_of_2(splits),
        )  # fmt: skip
    else:
        if seeds is None:
            gen_device = generator.device if generator is not None else device
            seeds = torch.randint(0, 2**63 - 1, (B,), generator=generator, device=gen_device, dtype=torch.int64)
        if seeds.shape != (B,):
            raise ValueError(f"seeds must be [B]=[{B}], got shape {tuple(seeds.shape)}")
        seeds = seeds.to(device=device, dtype=torch.int64)
        if _noise is not None:
            u, e = (t.to(device=device, dtype=torch.float32).contiguous() for t in _noise)
            if u.shape != (B, K) or e.shape != (B, V):
                raise ValueError("_noise must be (u [B, K], e [B, V])")
        else:
            u = e = seeds  # never read
        splits = num_splits or _num_splits(B, V, block_v, device)
        chunk = triton.cdiv(triton.cdiv(V, splits), block_v) * block_v
        splits = triton.cdiv(V, chunk)
        part_f = torch.empty((2, B, splits), dtype=torch.float32, device=device)
        part_i = torch.empty((3, B, splits), dtype=torch.int32, device=device)
        p, q = target_probs, draft_probs
        if q is None or q.numel() == 0:
            q = p  # point mass, or K == 0: q is never dereferenced, but the pointer must be real
        _sample_kernel[(B, splits)](
            tokens, num_accepted,
            part_f[0], part_i[0], part_f[1], part_i[1], part_i[2],
            err,
            draft_tokens, draft_tokens.stride(0), draft_tokens.stride(1),
            draft_lens,
            p, p.stride(0), p.stride(1), p.stride(2),
            q, q.stride(0), q.stride(1), q.stride(2),
            seeds, u, e,
            K, V, chunk,
            NUM_SPLITS=splits,
            BLOCK_K=triton.next_power_of_2(max(K, 1)),
            BLOCK_K1=block_k1,
            BLOCK_V=block_v,
            WIDE_DTYPE=tl.float64 if p.dtype == torch.float64 else tl.float32,
            FULL_NAN_CHECK=full,
            EXTERNAL_NOISE=_noise is not None,
            POINT_MASS=draft_probs is None,
        )  # fmt: skip
        if splits > 1:
            _sample_finalize_kernel[(B,)](
                tokens, num_accepted,
                part_f[0], part_i[0], part_f[1], part_i[1], part_i[2],
                draft_tokens, draft_tokens.stride(0), draft_tokens.stride(1),
                K,
                NUM_SPLITS=splits,
                BLOCK_K1=block_k1,
                BLOCK_S=triton.next_power_of_2(splits),
            )  # fmt: skip

    # One host sync for all value checks; the caller reads the tokens anyway.
    if int(err.item()) != 0:
        _raise_invalid(draft_tokens, draft_lens, target_probs, draft_probs, greedy)
    return VerificationResult(tokens=tokens, num_accepted=num_accepted)
