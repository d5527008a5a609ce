"""The Triton kernels of the row update and of rounding (imported when first launched: it imports
``triton``). The launchers and their custom ops are :mod:`pfc.head.kernels.rows_triton`.

Under ``TRITON_INTERPRET=1`` (read by ``triton`` when it is imported, and by ``triton.jit`` when
these kernels are defined) they run on CPU tensors in Triton's interpreter.
"""
from __future__ import annotations

import triton
import triton.language as tl

# how a value reaches its storage: as it is (float32), rounded to nearest (bf16/fp16: the type
# cast's round-half-to-even) or stochastically
STORE_AS_IS, STORE_NEAREST, STORE_STOCHASTIC = 0, 1, 2


@triton.jit
def _widen(value):
    """A loaded value as fp32 (bf16 by its bits: exact everywhere, the interpreter included)."""
    if value.dtype == tl.bfloat16:
        return (value.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return value.to(tl.float32)


@triton.jit
def _bfloat16_bits(x, noise, STOCHASTIC: tl.constexpr):
    """The bf16 bit pattern (uint32, high half zero) of fp32 ``x``: rounded to nearest even
    (``+ 0x7FFF + lowest kept bit``, torch's cast) or stochastically (``+ 16 random bits`` of
    ``noise``: a carry rounds the magnitude up with probability (dropped bits)/2¹⁶), then the
    low 16 bits dropped. A carry into the exponent is the next bf16 (inf past the largest
    finite value); NaN stays NaN (its sign kept, the quiet bit set: a NaN pattern can carry into
    inf or wrap around); ±inf and ±0 stay."""
    bits = x.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        rounded = bits + (noise & 0xFFFF)
    else:
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return tl.where(x != x, (bits >> 16) | 0x40, rounded >> 16)


@triton.jit
def _stochastic_float16(x, noise):
    """``x`` (fp32) rounded stochastically onto the float16 grid, still fp32 (exact in float16, or
    beyond 65504 where the cast gives ±inf as round-to-nearest would): with ``s`` the float16
    spacing at ``|x|`` (``2^(e−10)``, at least ``2^−24``), ``q = |x|/s`` (exact), the result is
    ``sign(x)·(⌊q⌋ + [u < q − ⌊q⌋])·s``, ``u`` the top 24 bits of ``noise`` over 2²⁴. ±inf, NaN
    pass through the arithmetic as they are."""
    bits = x.to(tl.uint32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF).to(tl.int32)
    spacing = ((tl.maximum(exponent - 137, -24) + 127) << 23).to(tl.float32, bitcast=True)
    scaled = tl.abs(x) / spacing
    low = tl.floor(scaled)
    up = (noise >> 8).to(tl.float32) < (scaled - low) * 16777216.0
    magnitude = (low + up.to(tl.float32)) * spacing
    return (magnitude.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def _store(pointer, value, noise, mask, MODE: tl.constexpr):
    """Store fp32 ``value`` into ``pointer``'s type: as it is (fp32), to nearest (MODE 1) or
    stochastically (MODE 2)."""
    kind = pointer.dtype.element_ty
    if kind == tl.bfloat16:
        bits = _bfloat16_bits(value, noise, MODE == 2)
        tl.store(pointer, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    elif kind == tl.float16:
        if MODE == 2:
            value = _stochastic_float16(value, noise)
        tl.store(pointer, value.to(tl.float16), mask=mask)
    else:
        tl.store(pointer, value.to(kind), mask=mask)


@triton.jit(do_not_specialize=["num_rows", "row_start", "seed"])
def row_update_kernel(W, V, G, ROWS, FOUND_INF, OLD_W, OLD_V, UNSCALE, RADIAL,
                      num_rows, row_start, D, w_stride, v_stride, g_stride, old_w_stride, old_v_stride,
                      lr, momentum, weight_decay, seed,
                      HAS_ROWS: tl.constexpr, USE_MOMENTUM: tl.constexpr, LOAD_V: tl.constexpr,
                      HAS_DECAY: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_UNSCALE: tl.constexpr,
                      HAS_RADIAL: tl.constexpr, SAVE_W: tl.constexpr,
                      SAVE_V: tl.constexpr, W_MODE: tl.constexpr, V_MODE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``[pid0·BLOCK_R, …)`` × columns ``[pid1·BLOCK_D, …)`` of the update: gather ``W`` and
    ``V`` rows (by ``ROWS`` or from ``row_start``), widen (with HAS_RADIAL the gradient is
    ``G − c·w``, ``c`` the row's fp32 at ``RADIAL``: the center gradient's radial term, one FMA on
    the row already loaded; then times the fp32 at ``UNSCALE`` when HAS_UNSCALE: a loss scale's
    inverse), ``d = g + wd·w; v = μ·v + d;
    w = w − lr·v`` in fp32, the old values to ``OLD_W``/``OLD_V``, and the new ones rounded back
    unless ``FOUND_INF`` is nonzero. Random bits: Philox keyed by ``seed`` at counter
    ``row·D + column`` (first word for W, second for V)."""
    position = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    column = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows = position < num_rows
    mask = in_rows[:, None] & (column < D)[None, :]
    if HAS_ROWS:
        row = tl.load(ROWS + position, mask=in_rows, other=0).to(tl.int64)
    else:
        row = row_start + position.to(tl.int64)
    local = position.to(tl.int64)[:, None]
    w_at = W + row[:, None] * w_stride + column[None, :]
    stored_w = tl.load(w_at, mask=mask, other=0.0)
    w = _widen(stored_w)
    step = _widen(tl.load(G + local * g_stride + column[None, :], mask=mask, other=0.0))
    if HAS_RADIAL:   # the radial term belongs to the (scaled) gradient: before the unscaling
        step = step - tl.load(RADIAL + position, mask=in_rows, other=0.0)[:, None] * w
    if HAS_UNSCALE:   # loaded once per column, as FOUND_INF below
        step = step * tl.load(UNSCALE + column * 0)[None, :]
    if HAS_DECAY:
        step = step + weight_decay * w
    if LOAD_V:
        v_at = V + row[:, None] * v_stride + column[None, :]
        stored_v = tl.load(v_at, mask=mask, other=0.0)
        if SAVE_V:
            tl.store(OLD_V + local * old_v_stride + column[None, :], stored_v, mask=mask)
        if USE_MOMENTUM:
            step = momentum * _widen(stored_v) + step
    if SAVE_W:
        tl.store(OLD_W + local * old_w_stride + column[None, :], stored_w, mask=mask)
    w = w - lr * step
    if HAS_SKIP:   # the flag loaded once per column (the interpreter cannot AND a scalar into a block)
        mask = mask & (tl.load(FOUND_INF + column * 0) == 0)[None, :]
    noise_w = 0
    noise_v = 0
    if W_MODE == 2 or V_MODE == 2:
        noise_w, noise_v, _, _ = tl.randint4x(seed, row[:, None] * D + column[None, :])
    _store(w_at, w, noise_w, mask, W_MODE)
    if USE_MOMENTUM:
        _store(v_at, step, noise_v, mask, V_MODE)


@triton.jit(do_not_specialize=["numel"])
def round_kernel(X, OUT, SEED, numel, BLOCK: tl.constexpr):
    """``OUT[i]`` = ``X[i]`` (fp32) rounded stochastically into ``OUT``'s type (bf16/fp16), the
    random bits from Philox keyed by the int64 at ``SEED`` at counter ``i``."""
    offset = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offset < numel
    x = tl.load(X + offset, mask=mask, other=0.0)
    noise, _, _, _ = tl.randint4x(tl.load(SEED), offset)
    _store(OUT + offset, x, noise, mask, 2)


def launch_row_update(weight, momentum, rows, row_start, grad, found_inf, old_weight, old_momentum,
                      lr, momentum_factor, weight_decay, seed, weight_mode, momentum_mode,
                      use_momentum, interpreted, unscale=None, radial=None) -> None:
    """One launch of :func:`row_update_kernel` over the ``grad.shape[0]`` rows (tensors already
    checked by the caller: row-major rows, on one device). Multiply-adds may fuse into FMAs
    (``enable_fp_fusion``, Triton's default until 3.10 made explicit: as nvcc compiles torch's
    own CUDA SGD kernels)."""
    num_rows, dim = grad.shape
    block_d = min(triton.next_power_of_2(dim), 1024)
    # a GPU program holds 2048 values (four rows of 512); the interpreter, whose cost is per
    # program, takes larger blocks
    block_r = max(1, (16384 if interpreted else 2048) // block_d)
    grid = (triton.cdiv(num_rows, block_r), triton.cdiv(dim, block_d))
    load_v = momentum is not None and (use_momentum or old_momentum is not None)
    dummy = grad   # any pointer, for the arguments a constexpr leaves unread
    row_update_kernel[grid](
        weight, momentum if momentum is not None else dummy, grad, rows if rows is not None else dummy,
        found_inf if found_inf is not None else dummy,
        old_weight if old_weight is not None else dummy, old_momentum if old_momentum is not None else dummy,
        unscale if unscale is not None else dummy, radial if radial is not None else dummy,
        num_rows, row_start, dim, weight.stride(0), momentum.stride(0) if momentum is not None else 0,
        grad.stride(0), old_weight.stride(0) if old_weight is not None else 0,
        old_momentum.stride(0) if old_momentum is not None else 0,
        lr, momentum_factor, weight_decay, seed,
        HAS_ROWS=rows is not None, USE_MOMENTUM=use_momentum, LOAD_V=load_v, HAS_DECAY=weight_decay != 0,
        HAS_SKIP=found_inf is not None, HAS_UNSCALE=unscale is not None,
        HAS_RADIAL=radial is not None, SAVE_W=old_weight is not None,
        SAVE_V=old_momentum is not None and momentum is not None,
        W_MODE=weight_mode, V_MODE=momentum_mode, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        enable_fp_fusion=True)


def launch_round(out, x, seed, interpreted) -> None:
    """One launch of :func:`round_kernel` over contiguous ``x`` and ``out``."""
    numel = x.numel()
    block = 16384 if interpreted else 2048
    round_kernel[(triton.cdiv(numel, block),)](x, out, seed, numel, BLOCK=block, num_warps=4, enable_fp_fusion=True)
