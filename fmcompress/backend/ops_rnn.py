"""Recurrent ops: LSTM and GRU (ONNX opsets 7 to 22), differentiable end to end.

Both directions of a bidirectional node run together as a batch of two (one batched
matmul per time step instead of two), after the input projection of every time step
is done up front in one matmul. The reverse direction reads the time-flipped input.
`sequence_lens` is honoured by masking: a sequence past its length keeps its state and
outputs zeros, so the reverse direction starts each sequence at its own last element and
a zero-length one ends in a zero state (both as onnxruntime does). Activations: the eleven
the spec lists, names in any case. Attributes are parsed once per node (ctx.cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from .registry import NodeCtx, ints, op

Activation = Callable[[torch.Tensor], torch.Tensor]
DIRECTIONS = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}
DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh")}
GATES = {"LSTM": 4, "GRU": 3}

# lower-case name -> (fn(x, alpha, beta), takes alpha, takes beta, default alpha, default beta).
# The defaults and the consumption of activation_alpha/beta in order, only by the activations
# that take them, follow onnxruntime's rnn_helpers (the ONNX spec leaves them open).
_ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor, float, float], torch.Tensor], bool, bool, float, float]] = {
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), False, False, 0.0, 0.0),
    "tanh": (lambda x, a, b: torch.tanh(x), False, False, 0.0, 0.0),
    "relu": (lambda x, a, b: torch.relu(x), False, False, 0.0, 0.0),
    "affine": (lambda x, a, b: x * a + b, True, True, 0.0, 0.0),
    "leakyrelu": (lambda x, a, b: F.leaky_relu(x, a), True, False, 0.01, 0.0),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), True, False, 0.0, 0.0),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), True, True, 0.0, 0.0),
    "hardsigmoid": (lambda x, a, b: torch.clamp(x * a + b, 0.0, 1.0), True, True, 0.2, 0.5),
    "elu": (lambda x, a, b: F.elu(x, a), True, False, 1.0, 0.0),
    "softsign": (lambda x, a, b: F.softsign(x), False, False, 0.0, 0.0),
    "softplus": (lambda x, a, b: F.softplus(x), False, False, 0.0, 0.0),
}


@dataclass(frozen=True)
class _Config:
    reverse: tuple[bool, ...]  # per direction
    acts: tuple[tuple[Activation, ...], ...]  # per gate function (f, g[, h]): one, or one per direction
    clip: float | None
    layout: int


def _rnn_check(ctx: NodeCtx) -> str | None:
    direction = ctx.attr("direction", "forward")
    if direction not in DIRECTIONS:
        return f"{ctx.op_type}(direction={direction})"
    if ctx.attr("layout", 0) not in (0, 1):
        return f"{ctx.op_type}(layout={ctx.attr('layout')})"
    names = [n.decode() if isinstance(n, bytes) else n for n in ctx.attr("activations", [])]
    unknown = [n for n in names if n.lower() not in _ACTIVATIONS]
    if unknown:
        return f"{ctx.op_type}(activations={unknown[0]})"
    per_direction = len(DEFAULT_ACTIVATIONS[ctx.op_type])
    if names and len(names) != per_direction * len(DIRECTIONS[direction]):
        return f"{ctx.op_type}(activations: {len(names)} for {direction})"
    return None


def _activations(ctx: NodeCtx, n_dirs: int) -> tuple[tuple[Activation, ...], ...]:
    """Per gate function, its activation: one when every direction uses the same, else one per direction."""
    defaults = DEFAULT_ACTIVATIONS[ctx.op_type]
    names = [n.decode() if isinstance(n, bytes) else n for n in ctx.attr("activations", [])] or list(defaults) * n_dirs
    alphas, betas = list(ctx.attr("activation_alpha", [])), list(ctx.attr("activation_beta", []))
    specs: list[tuple[str, float, float]] = []
    for name in names:
        _, takes_alpha, takes_beta, alpha, beta = _ACTIVATIONS[name.lower()]
        alpha = alphas.pop(0) if takes_alpha and alphas else alpha
        beta = betas.pop(0) if takes_beta and betas else beta
        specs.append((name.lower(), float(alpha), float(beta)))
    per_direction = len(defaults)
    result = []
    for g in range(per_direction):
        gate = [specs[d * per_direction + g] for d in range(n_dirs)]
        result.append(tuple(_bind(spec) for spec in (gate[:1] if len(set(gate)) == 1 else gate)))
    return tuple(result)


def _bind(spec: tuple[str, float, float]) -> Activation:
    name, alpha, beta = spec
    fn = _ACTIVATIONS[name][0]
    return lambda x: fn(x, alpha, beta)


def _config(ctx: NodeCtx) -> _Config:
    config = ctx.cache.get("rnn")
    if config is None:
        reverse = DIRECTIONS[ctx.attr("direction", "forward")]
        clip = ctx.attr("clip")
        config = ctx.cache["rnn"] = _Config(reverse=reverse, acts=_activations(ctx, len(reverse)),
                                            clip=None if clip is None else float(clip),
                                            layout=int(ctx.attr("layout", 0)))
    return config


def _apply(acts: Sequence[Activation], x: torch.Tensor) -> torch.Tensor:
    """x is [directions, ...]: one activation for all, or one per direction when they differ."""
    if len(acts) == 1:
        return acts[0](x)
    return torch.stack([act(x[d]) for d, act in enumerate(acts)])


def _clip(config: _Config, x: torch.Tensor) -> torch.Tensor:
    return x if config.clip is None else torch.clamp(x, -config.clip, config.clip)


# ---------------------------------------------------------------- shared plumbing


@dataclass
class _Sequence:
    """Time-major inputs stacked per direction, and the per-step validity masks."""

    xw: torch.Tensor  # [dirs, T, B, gates*H]: X W^T + biases, reverse directions time-flipped
    lengths: torch.Tensor | None  # [B] when some sequence is shorter than T
    steps: int

    def valid(self, step: int, reverse: tuple[bool, ...]) -> torch.Tensor | None:
        """[dirs, B, 1] mask of the sequences that still run at this step (None: all do)."""
        if self.lengths is None:
            return None
        times = torch.tensor([self.steps - 1 - step if r else step for r in reverse], device=self.lengths.device)
        return (times[:, None] < self.lengths[None, :])[..., None]


def _time_major(config: _Config, x: torch.Tensor, *states: torch.Tensor | None):
    """Layout 1 ([B, T, I], states [B, dirs, H]) to layout 0 ([T, B, I], states [dirs, B, H])."""
    if config.layout == 0:
        return (x, *states)
    return (x.transpose(0, 1), *[None if s is None else s.transpose(0, 1) for s in states])


def _lengths(ctx: NodeCtx, seq_lens: torch.Tensor | None, steps: int, device: torch.device) -> torch.Tensor | None:
    if seq_lens is None:
        return None
    values = ints(seq_lens)
    if any(v < 0 or v > steps for v in values):
        raise InputError(f"{ctx.op_type} node {ctx.name!r}: sequence_lens {values[:8]} outside 0..{steps}")
    return None if all(v == steps for v in values) else torch.tensor(values, device=device)


def _input_projection(config: _Config, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """X W^T (+ bias) for every time step and direction at once: [dirs, T, B, rows]."""
    steps, batch, _ = x.shape
    inputs = torch.stack([x.flip(0) if r else x for r in config.reverse]).reshape(len(config.reverse), steps * batch, -1)
    projected = torch.bmm(inputs, w.transpose(1, 2)) if bias is None else torch.baddbmm(
        bias[:, None, :], inputs, w.transpose(1, 2))
    return projected.reshape(len(config.reverse), steps, batch, -1)


def _initial(state: torch.Tensor | None, like: torch.Tensor, dirs: int, batch: int, hidden: int) -> torch.Tensor:
    if state is None:
        return like.new_zeros(dirs, batch, hidden)
    return state.to(like.dtype)


def _sequence_output(config: _Config, outputs: list[torch.Tensor]) -> torch.Tensor:
    """Per-step [dirs, B, H] (in processing order) to Y: [T, dirs, B, H], reverse directions unflipped."""
    y = torch.stack(outputs)
    if any(config.reverse):
        y = torch.stack([y[:, d].flip(0) if r else y[:, d] for d, r in enumerate(config.reverse)], dim=1)
    return y


def _finish(ctx: NodeCtx, config: _Config, seq: _Sequence, outputs: list[torch.Tensor],
            states: list[torch.Tensor]):
    """Y, Y_h[, Y_c] in the node's layout; zero-length sequences end in a zero state (as onnxruntime)."""
    if seq.lengths is not None:
        alive = (seq.lengths > 0)[None, :, None]
        states = [torch.where(alive, s, torch.zeros_like(s)) for s in states]
    y = _sequence_output(config, outputs)
    if config.layout == 1:
        y, states = y.permute(2, 0, 1, 3), [s.transpose(0, 1) for s in states]
    results = (y, *states)
    return results[0] if ctx.n_outputs == 1 else results[: ctx.n_outputs]


def _keep(mask: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return new if mask is None else torch.where(mask, new, old)


def _emit(mask: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    return h if mask is None else torch.where(mask, h, torch.zeros_like(h))


def _prepare(ctx: NodeCtx, x: torch.Tensor, w: torch.Tensor, seq_lens: torch.Tensor | None,
             bias: torch.Tensor | None) -> tuple[_Config, _Sequence]:
    config = _config(ctx)
    if w.shape[0] != len(config.reverse):
        raise InputError(f"{ctx.op_type} node {ctx.name!r}: W has {w.shape[0]} direction(s), "
                         f"direction={ctx.attr('direction', 'forward')} needs {len(config.reverse)}")
    seq = _Sequence(xw=_input_projection(config, x, w, bias), steps=x.shape[0],
                    lengths=_lengths(ctx, seq_lens, x.shape[0], x.device))
    return config, seq


# ---------------------------------------------------------------- LSTM


@op("LSTM", check=_rnn_check)
def lstm(ctx: NodeCtx, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None = None,
         seq_lens: torch.Tensor | None = None, h0: torch.Tensor | None = None, c0: torch.Tensor | None = None,
         p: torch.Tensor | None = None):
    x, h0, c0 = _time_major(_config(ctx), x, h0, c0)
    hidden = r.shape[-1]
    bias = None if b is None else b[:, : 4 * hidden] + b[:, 4 * hidden:]  # Wb + Rb
    config, seq = _prepare(ctx, x, w, seq_lens, bias)
    dirs, batch = len(config.reverse), x.shape[1]
    h = _initial(h0, seq.xw, dirs, batch, hidden)
    c = _initial(c0, seq.xw, dirs, batch, hidden)
    peep = None if p is None else [v[:, None, :] for v in p.split(hidden, dim=-1)]  # i, o, f: [dirs, 1, H]
    recurrent = r.transpose(1, 2)
    outputs = []
    for step in range(seq.steps):
        mask = seq.valid(step, config.reverse)
        h_new, c_new = _lstm_cell(ctx, config, torch.baddbmm(seq.xw[:, step], h, recurrent), c, peep)
        h, c = _keep(mask, h_new, h), _keep(mask, c_new, c)
        outputs.append(_emit(mask, h_new))
    return _finish(ctx, config, seq, outputs, [h, c])


def _lstm_cell(ctx: NodeCtx, config: _Config, gates: torch.Tensor, c: torch.Tensor,
               peep: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    f_act, g_act, h_act = config.acts
    i, o, f, cell = gates.chunk(4, dim=-1)
    if peep is not None:
        i, f = i + peep[0] * c, f + peep[2] * c
    i = _apply(f_act, _clip(config, i))
    # input_forget couples the gates: f = 1 - i (onnxruntime's reading of the attribute)
    f = 1.0 - i if ctx.attr("input_forget", 0) else _apply(f_act, _clip(config, f))
    c_new = f * c + i * _apply(g_act, _clip(config, cell))
    if peep is not None:
        o = o + peep[1] * c_new
    h_new = _apply(f_act, _clip(config, o)) * _apply(h_act, c_new)
    return h_new, c_new


# ---------------------------------------------------------------- GRU


@op("GRU", check=_rnn_check)
def gru(ctx: NodeCtx, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None, h0: torch.Tensor | None = None):
    x, h0 = _time_major(_config(ctx), x, h0)
    hidden = r.shape[-1]
    linear_before_reset = bool(ctx.attr("linear_before_reset", 0))
    bias, r_bias_h = _gru_bias(b, hidden, linear_before_reset)
    config, seq = _prepare(ctx, x, w, seq_lens, bias)
    h = _initial(h0, seq.xw, len(config.reverse), x.shape[1], hidden)
    recurrent = r.transpose(1, 2)  # [dirs, H, 3H]: z, r, h columns
    outputs = []
    for step in range(seq.steps):
        mask = seq.valid(step, config.reverse)
        h_new = _gru_cell(config, seq.xw[:, step], h, recurrent, r_bias_h, hidden, linear_before_reset)
        h = _keep(mask, h_new, h)
        outputs.append(_emit(mask, h_new))
    return _finish(ctx, config, seq, outputs, [h])


def _gru_bias(b: torch.Tensor | None, hidden: int,
              linear_before_reset: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The bias folded into the input projection, and Rbh when it must stay inside r * (...)."""
    if b is None:
        return None, None
    w_bias, r_bias = b[:, : 3 * hidden], b[:, 3 * hidden:]
    if linear_before_reset:
        folded = w_bias + torch.cat([r_bias[:, : 2 * hidden], torch.zeros_like(r_bias[:, 2 * hidden:])], dim=-1)
        return folded, r_bias[:, None, 2 * hidden:]
    return w_bias + r_bias, None


def _gru_cell(config: _Config, xw: torch.Tensor, h: torch.Tensor, recurrent: torch.Tensor,
              r_bias_h: torch.Tensor | None, hidden: int, linear_before_reset: bool) -> torch.Tensor:
    f_act, g_act = config.acts
    x_zr, x_h = xw[..., : 2 * hidden], xw[..., 2 * hidden:]
    if linear_before_reset:
        hr = torch.bmm(h, recurrent)
        zr = _apply(f_act, _clip(config, x_zr + hr[..., : 2 * hidden]))
        z, reset = zr.chunk(2, dim=-1)
        h_rec = hr[..., 2 * hidden:] if r_bias_h is None else hr[..., 2 * hidden:] + r_bias_h
        candidate = x_h + reset * h_rec
    else:
        zr = _apply(f_act, _clip(config, torch.baddbmm(x_zr, h, recurrent[..., : 2 * hidden])))
        z, reset = zr.chunk(2, dim=-1)
        candidate = torch.baddbmm(x_h, reset * h, recurrent[..., 2 * hidden:])
    h_tilde = _apply(g_act, _clip(config, candidate))
    return (1.0 - z) * h_tilde + z * h
