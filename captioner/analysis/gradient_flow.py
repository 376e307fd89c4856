"""Gradient flow through the recurrence: how ||dL/dh_t|| changes with the distance from the loss.

A loss on the LAST step's output only reaches an earlier hidden state through the chain of step Jacobians

    dL/dh_{t-1} = J_t^T dL/dh_t,   J_t = diag(f'(a_t)) W_hh   (vanilla RNN, a_t its pre-activation),

so each step back multiplies the gradient by roughly (largest singular value of W_hh) x (typical f'). With
tanh, f' <= 1: a W_hh of spectral norm < 1 makes the gradient vanish geometrically; a spectral norm > 1
makes it explode, but only while the pre-activations stay in tanh's linear regime (f' ~ 1) -- once h
saturates, f' ~ 0 and the gradient dies anyway. The LSTM's cell state adds a path whose Jacobian is the
forget gate itself (dc_{t-1} = f_t * dc_t), with no W_hh and no squashing derivative in it, so with the
forget-gate bias at 1 (the decoder's init) its gradient decays more slowly than the vanilla RNN's.

This module measures it on a CaptionDecoder driven one step at a time through its public `init_state` /
`step` API (the one search uses), so that every h_t is a tensor we can `retain_grad` on and the network
measured is exactly the one trained, highway gates and image injection included. Training runs whole
sequences through the kernels instead (captioner.model.decoder).

    rescale_recurrence(model, 2.0)                          # W_hh blocks to spectral norm 2
    scale_inputs(model, 1e-12)                              # tanh stays linear: the explosion shows
    norms = gradient_norms(model, features, inputs)         # (L, T): layer x step
    decay_factor(norms[-1])                                 # geometric mean of ||g_{t-1}|| / ||g_t||
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from captioner.atomic import atomic_write
from captioner.config import ModelConfig
from captioner.model.decoder import CaptionDecoder

# The gate blocks of weight_hh_l0, in PyTorch's row order.
GATES = {"rnn": ("h",), "lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n")}


def fresh_model(cell: str, hidden: int, vocab_size: int = 1000, feature_dim: int = 256,
                seed: int = 0) -> CaptionDecoder:
    """A decoder as training starts it (orthogonal W_hh blocks, LSTM forget bias 1), no dropout."""
    torch.manual_seed(seed)
    cfg = ModelConfig(cell=cell, embed_dim=hidden, hidden_dim=hidden, num_layers=1, dropout=0.0)
    return CaptionDecoder(cfg, vocab_size=vocab_size, feature_dim=feature_dim).eval()


def recurrent_weights(model: CaptionDecoder) -> list[torch.Tensor]:
    """W_hh of every layer: (G*H, H), G gate blocks stacked on dim 0."""
    return [layer.weight_hh_l0 for layer in model.layers]


def spectral_norms(model: CaptionDecoder) -> list[dict[str, float]]:
    """Per layer: the largest singular value of W_hh as a whole and of each gate block."""
    out = []
    for w in recurrent_weights(model):
        w = w.detach()
        H = w.shape[1]
        gates = GATES[model.cfg.cell]
        row = {"W_hh": float(torch.linalg.matrix_norm(w, ord=2))}
        if len(gates) > 1:
            for name, block in zip(gates, w.split(H)):  # (H, H) per gate
                row[f"W_h{name}"] = float(torch.linalg.matrix_norm(block, ord=2))
        out.append(row)
    return out


@torch.no_grad()
def rescale_recurrence(model: CaptionDecoder, sigma: float) -> CaptionDecoder:
    """Scale every gate block of every W_hh so its largest singular value is `sigma` (in place)."""
    for w in recurrent_weights(model):
        for block in w.split(w.shape[1]):  # views into w: (H, H) each
            block.mul_(sigma / torch.linalg.matrix_norm(block, ord=2))
    return model


@torch.no_grad()
def scale_inputs(model: CaptionDecoder, scale: float) -> CaptionDecoder:
    """Multiply every layer's input matrix W_x by `scale` (in place): word and image terms together shrink.

    Biases are left alone (zero for a fresh vanilla RNN, so its pre-activations are then W_hh h + scale *
    W_x (x + P v)); this is how the explosion lesson keeps tanh in its linear regime.
    """
    for layer in model.layers:
        layer.weight_ih_l0.mul_(scale)
    return model


def linear_regime_scale(sigma: float, steps: int, target: float = 1e-3) -> float:
    """Input scale that keeps an RNN with ||W_hh|| = sigma > 1 linear for `steps` steps.

    With inputs of size ~s, h_t grows like s * sigma^t; s = target / sigma^steps keeps |h| <= ~target,
    where tanh'(a) = 1 - tanh(a)^2 ~ 1. Tiny, but float32 reaches 1e-38.
    """
    return target / sigma ** steps if sigma > 1 else 1.0


@dataclass
class Flow:
    """The gradient reaching each step, for one model/setting."""

    label: str
    h_norms: torch.Tensor  # (L, T) ||dL/dh_t|| per layer and step; step T-1 carries the loss
    spectral: list[dict[str, float]] = field(default_factory=list)  # per layer, see spectral_norms
    input_scale: float = 1.0
    mean_dtanh: float | None = None  # vanilla RNN: mean tanh'(a_t) = 1 - h_t^2 over units and steps


def gradient_norms(model: CaptionDecoder, features: torch.Tensor, inputs: torch.Tensor,
                   targets: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Run inputs (B, T) with image vectors features (B, F) one step at a time; the loss is the negative
    log-likelihood of `targets` (B,) (random words if None) at the LAST step only.

    Returns ||dL/dh_t|| (L, T) for every layer and the mean tanh' = 1 - h^2 over the top layer (how linear
    the vanilla RNN stayed). For the LSTM this is the gradient on h_t; its cell-state path shows up in it
    one step later, through the gates (the fused kernel does not expose a c_t whose gradient includes the
    same step's h_t, so dL/dc_t is not reported).
    """
    B, T = inputs.shape  # batch, time
    L = model.cfg.num_layers
    state = model.init_state(features)  # the decoder's own per-step API: injection, highway and all
    hs = [[] for _ in range(L)]  # hs[l][t]: (B, H), gradients retained
    for t in range(T):
        log_probs, state = model.step(inputs[:, t], state)  # (B, V)
        # The state's h_l is also what layer l sent upward at this step (CaptionDecoder._layers), so its
        # gradient sums both paths: up the stack / to the loss, and along time.
        for i, h in enumerate(state[:L]):
            h.retain_grad()
            hs[i].append(h)
    if targets is None:
        targets = torch.randint(4, model.vocab_size, (B,), generator=torch.Generator().manual_seed(1))
    loss = F.nll_loss(log_probs, targets, reduction="sum")
    model.zero_grad(set_to_none=True)
    loss.backward()
    h_norms = torch.stack([torch.stack([_norm(h.grad) for h in layer]) for layer in hs])  # (L, T)
    top = torch.stack([h.detach() for h in hs[-1]])  # (T, B, H)
    return h_norms, float((1 - top ** 2).mean())


def _norm(grad: torch.Tensor | None) -> torch.Tensor:
    # A state the loss cannot reach has no gradient: its norm is 0.
    return grad.norm() if grad is not None else torch.tensor(0.0)


def decay_factor(norms: torch.Tensor) -> float:
    """Geometric mean of ||dL/dh_{t-1}|| / ||dL/dh_t|| over the steps: (||g_0|| / ||g_{T-1}||)^(1/(T-1)).

    < 1: the gradient vanishes going back in time; > 1: it explodes. norms (T,), the loss at T-1.
    """
    T = norms.shape[0]
    first, last = float(norms[0]), float(norms[-1])
    if T < 2 or last == 0.0:
        return float("nan")
    if first == 0.0:
        return 0.0
    return math.exp((math.log(first) - math.log(last)) / (T - 1))


def measure(model: CaptionDecoder, label: str, steps: int = 50, batch: int = 16, input_scale: float = 1.0,
            seed: int = 0) -> Flow:
    """Gradient flow of a copy of `model` (inputs scaled by `input_scale`) on random words and images.

    Random image vectors are standard normal, as pooled CNN features roughly are after the decoder's
    projection; random words are drawn from the whole vocabulary (specials excluded).
    """
    model = copy.deepcopy(model).eval()
    if input_scale != 1.0:
        scale_inputs(model, input_scale)
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, model.feature_dim, generator=g)
    inputs = torch.randint(4, model.vocab_size, (batch, steps), generator=g)
    inputs[:, 0] = 1  # <start>
    h, dtanh = gradient_norms(model, features, inputs)
    return Flow(label, h, spectral_norms(model), input_scale, dtanh if model.cfg.cell == "rnn" else None)


def plot(flows: list[Flow], path: str | Path, title: str = "") -> Path:
    """Log-scale ||dL/dh_t|| (top layer, normalised to 1 at the loss) against the distance from the loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for flow in flows:
        norms = flow.h_norms[-1]  # (T,) top layer
        distance = torch.arange(norms.shape[0] - 1, -1, -1)  # the loss step is at distance 0
        rel = (norms / norms[-1]).clamp_min(1e-30)
        ax.semilogy(distance.numpy(), rel.numpy(), label=f"{flow.label}  (x{decay_factor(norms):.3g}/step)")
    ax.set_xlabel("steps back from the loss (t = T-1 - distance)")
    ax.set_ylabel("||dL/dh_t|| / ||dL/dh_{T-1}||")
    ax.set_title(title or "Gradient reaching each step from a loss on the last step")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    # Whole or not at all: a kill or a full disk never leaves half a figure.
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png"))
    plt.close(fig)
    return path


def report(flows: list[Flow]) -> str:
    """A table: spectral norms of W_hh (whole and per gate block), decay factor per step, per layer."""
    lines = [f"{'setting':<26} {'layer':>5} {'decay/step':>10} {'||g_0||/||g_T-1||':>17}  "
             f"{'mean tanh':>9}  spectral norm of W_hh (per gate block)"]
    for flow in flows:
        for layer, norms in enumerate(flow.h_norms):
            ratio = float(norms[0] / norms[-1]) if norms[-1] > 0 else float("nan")
            sigmas = "  ".join(f"{k} {v:.3f}" for k, v in flow.spectral[layer].items())
            dtanh = f"{flow.mean_dtanh:.3f}" if flow.mean_dtanh is not None and layer == len(flow.h_norms) - 1 \
                else "-"
            lines.append(f"{flow.label:<26} {layer:>5} {decay_factor(norms):>10.4f} {ratio:>17.3e}  "
                         f"{dtanh:>9}  {sigmas}")
    return "\n".join(lines)


def lesson(models: list[tuple[str, CaptionDecoder]], steps: int = 50,
           sigmas: list[float] | None = None) -> list[Flow]:
    """Every model as it is, then (for each sigma) a copy with its W_hh blocks rescaled to spectral norm sigma.

    A copy rescaled above 1 runs in the linear regime (inputs scaled by linear_regime_scale), since with
    saturated tanh units an explosion would be hidden by tanh' ~ 0; its label says so.
    """
    flows = []
    for label, model in models:
        flows.append(measure(model, label, steps=steps))
    for sigma in sigmas or []:
        for label, model in models:
            scaled = rescale_recurrence(copy.deepcopy(model), sigma)
            scale = linear_regime_scale(sigma, steps)
            name = f"{label} sigma={sigma:g}" + (" linear" if scale != 1.0 else "")
            flows.append(measure(scaled, name, steps=steps, input_scale=scale))
    return flows
