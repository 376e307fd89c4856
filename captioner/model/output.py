"""The output layer and its loss, a few hundred tokens at a time: y_t = W_hy h_t, log-softmax, cross-entropy.

The (tokens x vocabulary) logits are the largest tensors of training: 2,048 tokens x 3,000 words x 4 bytes
= 24.6 MB each, and the plain form builds several of them per step (the logits, their fp32 copy, the
log-probabilities, their gradient). Blocks that large are served by mmap and page-faulted in afresh at
every step, which on a virtual machine costs more than the arithmetic. Here the tokens go through the
projection, the log-softmax, the loss and its gradient in chunks of `CHUNK` rows, so no tensor larger
than (CHUNK, V) is ever made.

    loss = token_loss(h, decoder.out, Targets(ids, weights))     # sum_i w_i * CE_i, a scalar with a gradient

The gradient is computed during the forward pass, chunk by chunk, while each chunk's probabilities are at
hand (the weights w_i are known then): d CE_i / d z_i = p_i - q_i, with q_i the smoothed one-hot target.
Backward only scales the stored gradients by the incoming scalar, so nothing is recomputed. The result
equals the unchunked loss and gradients exactly in fp32, up to the summation order.

Options:
- label_smoothing eps: q_i = (1 - eps) one-hot(y_i) + eps / K over the K words that may be emitted (as
  F.cross_entropy's label_smoothing when no word is suppressed);
- suppressed: word ids whose logits are -inf (the never-emit words of search.captioning_policy), so their
  probability is 0 and the log-softmax is over the others, as decoding sees it;
- weights: one per token (a scalar broadcasts): 1 / n_tokens for the mean, 0 for padding, the advantage
  (r - b) / n for self-critical training's policy gradient (negative weights are fine);
- dtype: the GEMMs' number format (bf16 under autocast); the log-softmax and the loss are always fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CHUNK = 512  # tokens per chunk: (512, 3000) fp32 is 6 MB


class _ChunkedOutputLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, weights, label_smoothing, suppressed, dtype, chunk, need_grad):
        N, V = h.shape[0], weight.shape[0]
        w_mm = weight.to(dtype)
        b_mm = bias.to(dtype) if bias is not None else None
        K = V - (suppressed.numel() if suppressed is not None else 0)  # the words that may be emitted
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(V, h.shape[1], dtype=torch.float32, device=h.device) if need_grad else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=h.device) if need_grad and bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # Buffers made once and reused by every chunk: fresh blocks this large would be page-faulted in
        # again each time. `low` holds a GEMM's bf16 result before it is widened into the fp32 buffer.
        c = min(chunk, N)
        buf = torch.empty(c, V, dtype=torch.float32, device=h.device)
        low = torch.empty(c, V, dtype=dtype, device=h.device) if dtype != torch.float32 else None
        low_w = torch.empty(V, h.shape[1], dtype=dtype, device=h.device) if low is not None and need_grad else None
        for s in range(0, N, chunk):
            rows = slice(s, min(N, s + chunk))
            h_c, y, w_c = h[rows].to(dtype), targets[rows], weights[rows]
            n = h_c.shape[0]
            z = buf[:n]
            logits = low[:n] if low is not None else z
            if b_mm is not None:
                torch.addmm(b_mm, h_c, w_mm.t(), out=logits)
            else:
                torch.mm(h_c, w_mm.t(), out=logits)
            if low is not None:
                z.copy_(logits)  # widened to fp32 in place: the softmax and the loss are fp32
            if label_smoothing:  # sum over the emitted words of z, for the smoothing term
                z_sum = z.sum(1) - (z[:, suppressed].sum(1) if suppressed is not None else 0.0)
            if suppressed is not None:
                z.index_fill_(1, suppressed, float("-inf"))
            z_max = z.amax(1)
            z_y = z.gather(1, y[:, None]).squeeze(1)
            e = z.sub_(z_max[:, None]).exp_()  # exp(z - max), in place: z is not needed again
            e_sum = e.sum(1)
            lse = z_max + e_sum.log()  # log-sum-exp of the logits
            ce = lse - z_y  # -log p(y)
            if label_smoothing:  # - (1 - eps) log p(y) - eps / K sum_j log p(j)
                ce = (1.0 - label_smoothing) * ce - label_smoothing / K * (z_sum - K * lse)
            total += torch.where(w_c != 0, w_c * ce, 0.0).sum()  # weight 0 (padding) adds nothing, even to inf
            if need_grad:  # dLoss / dz = w (p - q), q the smoothed one-hot target; in place of e
                g = e.mul_((w_c / e_sum)[:, None])
                if label_smoothing:
                    g.sub_((w_c * (label_smoothing / K))[:, None])
                    if suppressed is not None:
                        g.index_fill_(1, suppressed, 0.0)
                g.scatter_add_(1, y[:, None], (w_c * -(1.0 - label_smoothing))[:, None])
                g_mm = low[:n].copy_(g) if low is not None else g
                if h.dtype == dtype:
                    torch.mm(g_mm, w_mm, out=grad_h[rows])
                else:
                    grad_h[rows] = torch.mm(g_mm, w_mm)
                if low_w is None:
                    grad_w.addmm_(g_mm.t(), h_c)
                else:
                    grad_w += torch.mm(g_mm.t(), h_c, out=low_w)
                if grad_b is not None:
                    grad_b += g.sum(0)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else torch.empty(0))
            ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_out).to(w_dtype) if ctx.needs_input_grad[1] else None
        gb = (grad_b * grad_out).to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        return gh, gw, gb, None, None, None, None, None, None, None


@dataclass(frozen=True)
class Targets:
    """What the N scored tokens should have said, and how much each counts (see the module docstring)."""

    ids: torch.Tensor  # (N,) word ids
    weights: torch.Tensor | float = 1.0  # (N,) or one for all
    label_smoothing: float = 0.0
    suppressed: torch.Tensor | None = None  # word ids never emitted


def token_loss(h: torch.Tensor, out: nn.Linear, targets: Targets, dtype: torch.dtype | None = None,
               chunk: int = CHUNK) -> torch.Tensor:
    """sum_i w_i * CE(softmax(out(h_i)), y_i): h (N, H) the top layer's outputs at the N scored tokens,
    `targets` their words y_i and weights w_i. See the module docstring for the options.

    `dtype` None: the GEMM dtype of the autocast in force where this is called (bf16), else fp32.
    """
    if dtype is None:
        dtype = autocast_dtype(h.device.type)
    label_smoothing, suppressed, weights = targets.label_smoothing, targets.suppressed, targets.weights
    targets = targets.ids.reshape(-1)
    n = targets.shape[0]
    if h.shape[0] != n:
        raise ValueError(f"token_loss: {h.shape[0]} hidden rows for {n} targets")
    weights = torch.as_tensor(weights, dtype=torch.float32, device=h.device).expand(n).contiguous()
    if suppressed is not None:
        suppressed = suppressed.to(h.device)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h, out.weight, out.bias))
    with torch.autocast(h.device.type, enabled=False):
        return _ChunkedOutputLoss.apply(h, out.weight, out.bias, targets, weights, float(label_smoothing),
                                        suppressed, dtype, int(chunk), need_grad)


def autocast_dtype(device_type: str) -> torch.dtype:
    """The GEMM dtype autocast would use here: its dtype when enabled for the device, else fp32."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32
