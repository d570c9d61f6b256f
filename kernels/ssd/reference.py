"""The SSD (state-space duality) scan of Mamba-2, the reference (plain jnp), in the paper's letters.

Per head h (``H`` heads of ``P`` channels, state size ``N``; heads share the ``B, C`` of their
group, ``G`` groups), for t = 1..T::

    a_t = exp(dt_t * A_h)                       (A_h = -exp(A_log_h) < 0: the decay)
    h_t = a_t * h_{t-1} + dt_t * x_t B_t^T      (state [P, N])
    y_t = h_t C_t                               ([P]; the D skip and the gate are the model's)

``ssd_recurrent`` is that recurrence as a scan (the specification, and the decode step);
``ssd_chunked`` is the chunked form of the Mamba-2 paper's minimal listing, its four stages:
  1. within each chunk of Q steps, the quadratic (attention-like) form with the decay mask
     L[i, j] = exp(sum_{j<k<=i} dt_k A);
  2. each chunk's own final state from its inputs;
  3. the recurrence over chunk boundaries, from ``initial_state``;
  4. each chunk's start state read out through C and the decay since the chunk's start.
Both take ``x [b, T, H, P]``, ``dt [b, T, H]`` (positive, after softplus), ``A [H]`` (or per step
``[b, T, H]``), ``B, C
[b, T, G, N]``, ``initial_state [b, H, P, N]`` (zeros if None) and return ``(y [b, T, H, P],
final_state [b, H, P, N])`` in fp32. T need not be a multiple of the chunk (the tail is padded
with dt = 0: no decay, no input).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
__all__ = ["ssd_chunked", "ssd_recurrent", "ssd_windowed", "segsum"]
_HI = jax.lax.Precision.HIGHEST


def _heads(bc: Array, h: int) -> Array:
    """``[b, T, G, N]`` -> ``[b, T, H, N]``: head h reads group h // (H / G)."""
    return jnp.repeat(bc, h // bc.shape[2], axis=2)


def segsum(x: Array) -> Array:
    """``x [..., Q]`` -> ``[..., Q, Q]``: ``out[i, j] = sum_{j<k<=i} x[k]`` for j <= i and -inf
    above the diagonal, summed directly (not as a difference of cumulative sums: no cancellation)."""
    q = x.shape[-1]
    i, j = jnp.arange(q)[:, None], jnp.arange(q)[None, :]
    xx = jnp.where(i > j, jnp.broadcast_to(x[..., :, None], x.shape + (q,)), 0.0)  # xx[k, j] = x[k] for k > j
    return jnp.where(i >= j, jnp.cumsum(xx, axis=-2), -jnp.inf)


def ssd_recurrent(x: Array, dt: Array, A: Array, B: Array, C: Array, initial_state: Array | None = None, *,
                  norm_cap: Array | None = None) -> tuple[Array, Array]:
    """The recurrence, one step at a time (``jax.lax.scan`` over T). ``A`` is ``[H]`` or per
    step ``[b, T, H]``. ``norm_cap [H]`` (Stuffed Mamba's state normalisation): after each step a
    head whose state's Frobenius norm exceeds its cap is divided by ``norm / cap``."""
    b, t, h, p = x.shape
    n = B.shape[-1]
    x, dt = x.astype(jnp.float32), dt.astype(jnp.float32)
    A = jnp.broadcast_to(A.astype(jnp.float32), dt.shape)
    B, C = _heads(B.astype(jnp.float32), h), _heads(C.astype(jnp.float32), h)
    s0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

    def step(s, inp):
        xt, dtt, at, bt, ct = inp  # [b, H, P], [b, H], [b, H], [b, H, N], [b, H, N]
        s = jnp.exp(dtt * at)[..., None, None] * s + (dtt[..., None] * xt)[..., None] * bt[:, :, None, :]
        if norm_cap is not None:
            norm = jnp.sqrt(jnp.sum(s * s, axis=(2, 3)))  # [b, H]
            s = s / jnp.maximum(norm / norm_cap.astype(jnp.float32), 1.0)[..., None, None]
        return s, jnp.einsum("bhpn,bhn->bhp", s, ct, precision=_HI)

    if t == 1:  # a decode step: the step itself, no loop around it
        final, y = step(s0, tuple(v[:, 0] for v in (x, dt, A, B, C)))
        return y[:, None], final
    final, y = jax.lax.scan(step, s0, tuple(jnp.moveaxis(v, 1, 0) for v in (x, dt, A, B, C)))
    return jnp.moveaxis(y, 0, 1), final


def ssd_windowed(x: Array, dt: Array, A: Array, B: Array, C: Array, *, window: int, keep_first: int = 0,
                 return_state: bool = False) -> Array | tuple[Array, Array]:
    """Stuffed Mamba's sliding window by state difference: ``y_t`` read from the state of only
    the last ``window`` inputs, ``h_t^(r) = h_t - (prod_{k=t-r+1..t} a_k) h_{t-r}`` (exact by
    linearity), from a scan carrying the full state, the last ``window`` full states and their
    log-decays (a ring; the window's decay is the sum of its log-decays, not a difference of
    running sums, so it does not lose precision as the context grows). Memory: ``window``
    states. Returns ``y [b, T, H, P]`` fp32 (from a zero state), and with ``return_state`` the
    full (unwindowed) final state ``[b, H, P, N]`` too, as ``ssd_chunked`` returns it.

    ``keep_first`` k > 0 keeps the state of the sequence's first k inputs beside the window, as
    attention sinks are kept beside a sliding window (not in the paper; for models that lean on
    their first token): once the window has left them, ``y_t`` reads
    ``h_t^(r) + (prod_{window} a) h_{k-1}``, what a scan over the first k inputs followed by the
    last r gives; before that, the whole state."""
    b, t, h, p = x.shape
    n = B.shape[-1]
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
        raise ValueError(f"window must be a positive int, got {window!r}")
    r = int(window)
    if r < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if isinstance(keep_first, bool) or not isinstance(keep_first, (int, np.integer)) or keep_first < 0:
        raise ValueError(f"keep_first must be an int >= 0, got {keep_first!r}")
    k = int(keep_first)
    x, dt = x.astype(jnp.float32), dt.astype(jnp.float32)
    A = jnp.broadcast_to(A.astype(jnp.float32), dt.shape)
    B, C = _heads(B.astype(jnp.float32), h), _heads(C.astype(jnp.float32), h)
    zero = jnp.zeros((b, h, p, n), jnp.float32)
    init = (zero, jnp.zeros((r, b, h, p, n), jnp.float32), jnp.zeros((r, b, h), jnp.float32),
            jnp.zeros((), jnp.int32), zero)

    def step(carry, inp):
        s, ring, logs, i, first = carry
        xt, dtt, at, bt, ct = inp
        la = dtt * at
        s = jnp.exp(la)[..., None, None] * s + (dtt[..., None] * xt)[..., None] * bt[:, :, None, :]
        slot = i % r
        logs = logs.at[slot].set(la)  # the ring now holds the log-decays of steps t-r+1..t
        old = ring[slot]  # h_{t-r} (zeros while t < r)
        if k:  # h_{k-1}, the first k inputs' state, replaces h_{t-r} once the window has left them
            first = jnp.where(i == k - 1, s, first)
            old = jnp.where(i >= r + k - 1, old - first, jnp.zeros_like(old))
        windowed = s - jnp.exp(jnp.sum(logs, axis=0))[..., None, None] * old
        ring = ring.at[slot].set(s)
        return (s, ring, logs, i + 1, first), jnp.einsum("bhpn,bhn->bhp", windowed, ct, precision=_HI)

    (final, *_), y = jax.lax.scan(step, init, tuple(jnp.moveaxis(v, 1, 0) for v in (x, dt, A, B, C)))
    return (jnp.moveaxis(y, 0, 1), final) if return_state else jnp.moveaxis(y, 0, 1)


def ssd_chunked(x: Array, dt: Array, A: Array, B: Array, C: Array, initial_state: Array | None = None, *,
                chunk_size: int = 256) -> tuple[Array, Array]:
    """The chunked form (stages 1-4 of the module docstring), chunks of ``chunk_size`` steps."""
    b, t, h, p = x.shape
    n = B.shape[-1]
    q = int(chunk_size)
    if q < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    pad = -t % q
    c = (t + pad) // q
    f32 = lambda a: jnp.pad(a.astype(jnp.float32), ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))  # noqa: E731
    dt = f32(dt)
    X = (f32(x) * dt[..., None]).reshape(b, c, q, h, p)  # discretized input dt * x
    Bh, Ch = f32(_heads(B, h)).reshape(b, c, q, h, n), f32(_heads(C, h)).reshape(b, c, q, h, n)
    A = jnp.pad(jnp.broadcast_to(A.astype(jnp.float32), (b, t, h)), ((0, 0), (0, pad), (0, 0)))  # [H] or [b, T, H]
    a = jnp.moveaxis((dt * A).reshape(b, c, q, h), 3, 1)  # log-decay [b, H, c, q]
    a_cum = jnp.cumsum(a, axis=-1)
    # 1. within chunks
    L = jnp.exp(segsum(a))  # [b, H, c, q, q]
    y_diag = jnp.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, L, X, precision=_HI)
    # 2. each chunk's final state from its own inputs
    decay_states = jnp.exp(a_cum[..., -1:] - a_cum)  # [b, H, c, q]
    states = jnp.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_states, X, precision=_HI)
    # 3. across chunk boundaries
    s0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    states = jnp.concatenate([s0[:, None], states], axis=1)  # [b, c + 1, H, P, N]
    decay_chunk = jnp.exp(segsum(jnp.pad(a_cum[..., -1], ((0, 0), (0, 0), (1, 0)))))  # [b, H, c + 1, c + 1]
    new_states = jnp.einsum("bhzc,bchpn->bzhpn", decay_chunk, states, precision=_HI)
    states, final = new_states[:, :-1], new_states[:, -1]
    # 4. start states read out
    y_off = jnp.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, jnp.exp(a_cum), precision=_HI)
    y = (y_diag + y_off).reshape(b, c * q, h, p)[:, :t]
    return y, final
