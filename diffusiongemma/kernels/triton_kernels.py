"""Triton kernels for CUDA (`fused.py` says when they run): the sampler's vocabulary-sized work, the RMS
norm, the self-conditioning input's softmax and the experts' products. A module of its own because importing
Triton takes time that a run without CUDA need not spend. Under TRITON_INTERPRET=1 (the tests) Triton's
interpreter runs them on CPU tensors."""

import triton
import triton.language as tl


@triton.jit
def _tanh(z):
    # Core operations only (Triton's interpreter has no libdevice): a series near 0, where 1 - e would
    # cancel, and (1 - e) / (1 + e) with e = exp(-2|z|) beyond. Within about 2 float32 ulps of tanh.
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    s = a * a
    near = a * (1.0 + s * (-0.3333333333333333 + s * (0.13333333333333333 + s * (-0.05396825396825397 + s * (
        0.021869488536155203 + s * (-0.008863235529902197 + s * 0.003592128036572481))))))
    value = tl.where(a < 0.3, near, (1.0 - e) / (1.0 + e))
    return tl.where(z < 0, -value, value)


@triton.jit
def _processed(scores, index, inside, cap, t, HAS_CAP: tl.constexpr):
    """y = logits / t at `index`, the logits soft-capped scores as the model's are; -inf outside the row
    (capping would bring -inf back to -cap)."""
    x = tl.load(scores + index, mask=inside, other=0.0).to(tl.float32)
    if HAS_CAP:
        x = _tanh(x / cap) * cap
    return tl.where(inside, x / t, float("-inf"))


@triton.jit
def denoise_kernel(scores, cap, temperature, per_temperature, variates, uniforms, processed, kept, tokens, argmax,
                   entropy, vocab, HAS_CAP: tl.constexpr, HAS_KEPT: tl.constexpr, SAMPLING: tl.constexpr, BLOCK: tl.constexpr):
    # One program per position. Each lane keeps its own running values over the blocks of the row and
    # the lanes are combined once at the end: no reduction across threads inside the loops, except
    # inverse_cdf's running sum, which has to follow the vocabulary's order.
    row = tl.program_id(0).to(tl.int64)
    first = row * vocab
    # Consecutive positions share a temperature: a request's canvas, or every position when there is one.
    t = tl.load(temperature + row // per_temperature)
    lanes = tl.arange(0, BLOCK)

    # Pass 1: the maximum of y = logits / t (and where it first occurs), and the sum of exp(y - maximum).
    # Lanes start from float32's lowest value rather than -inf, so that a lane past the vocabulary's end
    # adds exp(-inf) = 0 where starting from -inf would give exp(-inf - -inf), NaN.
    top = tl.full([BLOCK], -3.4028234663852886e38, tl.float32)
    top_index = tl.zeros([BLOCK], tl.int32)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        index = start + lanes
        inside = index < vocab
        y = _processed(scores + first, index, inside, cap, t, HAS_CAP)
        new_top = tl.maximum(top, y)
        total = total * tl.exp(top - new_top) + tl.exp(y - new_top)
        top_index = tl.where(y > top, index, top_index)
        top = new_top
    row_top = tl.max(top, axis=0)
    row_total = tl.sum(total * tl.exp(top - row_top), axis=0)
    row_top_index = tl.min(tl.where(top == row_top, top_index, vocab), axis=0)

    # Pass 2: probabilities, the entropy, the token, and y in the model's dtype for self-conditioning, unless
    # the position keeps what `processed` holds.
    if HAS_KEPT:
        write = tl.load(kept + row + lanes * 0) == 0
    else:
        write = lanes < BLOCK
    log_total = row_top + tl.log(row_total)
    terms = tl.zeros([BLOCK], tl.float32)
    best = tl.full([BLOCK], -1.0, tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    token = tl.full([], vocab, tl.int32)
    running = tl.full([], 0.0, tl.float32)
    if SAMPLING == 1:
        target = row_total * tl.load(uniforms + row)
    else:
        target = row_total
    for start in range(0, vocab, BLOCK):
        index = start + lanes
        inside = index < vocab
        y = _processed(scores + first, index, inside, cap, t, HAS_CAP)
        tl.store(processed + first + index, y.to(processed.dtype.element_ty), mask=inside & write)
        weight = tl.exp(y - row_top)
        p = weight / row_total
        # Log-probabilities clamped at float32's lowest value too, as a categorical distribution clamps them.
        terms += tl.where(inside, tl.maximum(y - log_total, -3.4028234663852886e38) * p, 0.0)
        if SAMPLING == 0:
            q = tl.load(variates + first + index, mask=inside, other=1.0)
            ratio = tl.where(inside, p / q, -1.0)
            best_index = tl.where(ratio > best, index, best_index)
            best = tl.maximum(best, ratio)
        elif SAMPLING == 1:
            # The first position whose cumulative weight passes the target, as searchsorted(right=True).
            cumulative = running + tl.cumsum(weight, axis=0)
            token = tl.minimum(token, tl.min(tl.where(cumulative > target, index, vocab), axis=0))
            running = tl.max(cumulative, axis=0)
    if SAMPLING == 0:
        token = tl.min(tl.where(best == tl.max(best, axis=0), best_index, vocab), axis=0)
    elif SAMPLING == 2:
        token = row_top_index
    tl.store(tokens + row, tl.minimum(token, vocab - 1).to(tl.int64))
    tl.store(argmax + row, row_top_index.to(tl.int64))
    tl.store(entropy + row, -tl.sum(terms, axis=0))


@triton.jit
def rms_norm_kernel(x, weight, out, rows, width, eps, HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK: tl.constexpr):
    # ROWS rows per program, each in float32: x * (mean(x^2) + eps)^-1/2, times the weight, in x's dtype.
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    column = tl.arange(0, BLOCK)[None, :]
    inside = (row < rows) & (column < width)
    values = tl.load(x + row * width + column, mask=inside, other=0.0).to(tl.float32)
    normed = values * tl.rsqrt(tl.sum(values * values, axis=1)[:, None] / width + eps)
    if HAS_WEIGHT:
        normed = normed * tl.load(weight + column, mask=column < width, other=0.0).to(tl.float32)
    tl.store(out + row * width + column, normed.to(out.dtype.element_ty), mask=inside)


@triton.jit
def softmax_kernel(x, out, width, BLOCK: tl.constexpr):
    # One program per row: a running maximum and sum per lane (as in denoise_kernel's first pass), then the
    # probabilities, computed in float32 and written in out's dtype.
    row = tl.program_id(0).to(tl.int64)
    first = row * width
    lanes = tl.arange(0, BLOCK)
    top = tl.full([BLOCK], -3.4028234663852886e38, tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, width, BLOCK):
        index = start + lanes
        values = tl.load(x + first + index, mask=index < width, other=float("-inf")).to(tl.float32)
        new_top = tl.maximum(top, values)
        total = total * tl.exp(top - new_top) + tl.exp(values - new_top)
        top = new_top
    row_top = tl.max(top, axis=0)
    row_total = tl.sum(total * tl.exp(top - row_top), axis=0)
    for start in range(0, width, BLOCK):
        index = start + lanes
        inside = index < width
        values = tl.load(x + first + index, mask=inside, other=float("-inf")).to(tl.float32)
        tl.store(out + first + index, (tl.exp(values - row_top) / row_total).to(out.dtype.element_ty), mask=inside)


@triton.jit
def grouped_linear_kernel(x, weight, scale, out, ends, experts, n, k, EXPERTS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          IN_FLOAT32: tl.constexpr, CODES: tl.constexpr, GROUPS: tl.constexpr):
    # A program computes BLOCK_N output columns of one block of BLOCK_M rows, which are one expert's. Programs
    # of one block come one after another, so those that run side by side read the same rows from cache
    # and each reads its own slice of the expert's weight, once. A block past the last expert's returns at
    # once: the grid is sized for the most blocks any routing can make.
    column_blocks = tl.cdiv(n, BLOCK_N)
    block = tl.program_id(0) // column_blocks
    # Each program works out the blocks from where the experts' rows end (EXPERTS: the experts' number to a
    # power of two): a few hundred values, read from cache, where kernels of their own would cost a launch
    # each. The block's expert is the first whose blocks end after it.
    everyone = tl.arange(0, EXPERTS)
    real = everyone < experts
    row_ends = tl.load(ends + everyone, mask=real, other=0)
    row_starts = tl.load(ends + everyone - 1, mask=real & (everyone > 0), other=0)
    blocks = tl.where(real, tl.cdiv(row_ends - row_starts, BLOCK_M), 0)
    block_ends = tl.cumsum(blocks, axis=0)
    expert = tl.sum((block_ends <= block).to(tl.int32), axis=0)
    if expert < experts:
        mine = everyone == expert
        first_row = tl.sum(tl.where(mine, row_starts, 0), axis=0)
        end_row = tl.sum(tl.where(mine, row_ends, 0), axis=0)
        first_block = tl.sum(tl.where(mine, block_ends - blocks, 0), axis=0)
        rows = first_row + (block - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
        columns = (tl.program_id(0) % column_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_inside, columns_inside = rows < end_row, columns < n
        rows, columns = rows.to(tl.int64), columns.to(tl.int64)
        # The expert's weight is [n, k]: a [BLOCK_K, BLOCK_N] tile of its transpose. Quantized weights
        # (`CODES`, see `fused.grouped_linear`) are read as codes and turned into x's dtype in registers, exactly
        # (int8 and e4m3 codes are bfloat16 numbers); their scales multiply the sums: once at the end for a
        # scale per output channel, per block of inputs for int4's group scales (a block lies in one group).
        stored_k = k // 2 if CODES == 2 else k
        expert_weight = weight + expert.to(tl.int64) * n * stored_k
        total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start in range(0, k, BLOCK_K):
            inner = start + tl.arange(0, BLOCK_K)
            inner_inside = inner < k
            a = tl.load(x + rows[:, None] * k + inner[None, :], mask=rows_inside[:, None] & inner_inside[None, :],
                        other=0.0)
            if CODES == 2:
                # Two codes a byte, the even input in the low four bits, stored plus 8.
                pairs = start // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(expert_weight + columns[:, None] * stored_k + pairs[None, :],
                                 mask=columns_inside[:, None] & (pairs < stored_k)[None, :], other=8)
                codes = tl.interleave(packed & 15, packed >> 4).to(tl.int32) - 8
                b = tl.trans(codes.to(tl.float32 if IN_FLOAT32 else a.dtype))
            else:
                b = tl.load(expert_weight + columns[None, :] * k + inner[:, None],
                            mask=columns_inside[None, :] & inner_inside[:, None], other=0.0)
                if CODES == 1:
                    b = b.to(tl.float32 if IN_FLOAT32 else a.dtype)
            if IN_FLOAT32:
                product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                product = tl.dot(a, b)
            if CODES == 2:
                group = tl.load(scale + (expert.to(tl.int64) * n + columns) * GROUPS + start * GROUPS // k,
                                mask=columns_inside, other=0.0)
                total += product * group.to(tl.float32)[None, :]
            else:
                total += product
        if CODES == 1:
            total *= tl.load(scale + expert.to(tl.int64) * n + columns, mask=columns_inside, other=0.0)[None, :]
        tl.store(out + rows[:, None] * n + columns[None, :], total.to(out.dtype.element_ty),
                 mask=rows_inside[:, None] & columns_inside[None, :])
