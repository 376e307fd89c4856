"""The RNN decoder that sees the image at every step.

    h_t = f(W_xh x_t + W_hh h_{t-1} + W_ih v)        y_t = W_hy h_t

x_t is the embedding of the previous word (the lookup form of W_xh on one-hot words) and v the CNN's image
vector. Cells: vanilla RNN (tanh), LSTM, GRU; for the gated cells the image term reaches every gate's
pre-activation at every step.

How the image term is computed once per caption and still runs through the fused kernels: each layer's
input at step t is x_t + P v, where P v is computed once per caption and broadcast over time. The fused
nn.RNN / nn.LSTM / nn.GRU kernel then multiplies that input by its input matrix W_x, so every gate gets

    W_x (x_t + P v) = W_x x_t + (W_x P) v,

i.e. W_ih = W_x P, a factorisation of the image matrix through the layer's input width. The kernel's cost
is unchanged (no concatenated input, no per-step image GEMM) and teacher-forced training never loops over
time in Python. Stacked layers are one single-layer kernel each, so every layer receives its own P_l v.

Conditioning modes (ModelConfig.conditioning):
- "inject": the image term at every step of every layer (the default, and the point of the project);
- "init":   h_0 (and c_0 for the LSTM) computed from v, no injection afterwards (Show and Tell style);
- "both":   both.

Decoding is not here: captioner.model.search drives `init_state` / `step` / `select_state` one step at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from captioner.config import ModelConfig
from captioner.model.output import Targets, token_loss

# A decoder state is a flat tuple of tensors, each with the batch on dim 0, so that beam search can
# reorder or repeat it with one index_select per tensor (see select_state):
#   (h_1, ..., h_L, [c_1, ..., c_L for the LSTM], [u_1, ..., u_L image inputs when injecting])
State = tuple[torch.Tensor, ...]

# The cells it builds, by their names in captioner.choices.CELLS (tests/test_choices.py keeps the two equal).
CELL_TYPES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
# One time step of each cell, as a function of the same weights the fused layer holds.
_CELL_FNS = {"rnn": torch.rnn_tanh_cell, "lstm": torch.lstm_cell, "gru": torch.gru_cell}
# Where each conditioning (captioner.choices.CONDITIONING) puts v: (into every step's input, into h_0).
CONDITIONING_INPUTS = {"inject": (True, False), "init": (False, True), "both": (True, True)}


class CaptionDecoder(nn.Module):
    """The RNN decoder; `init_state` / `step` / `select_state` make it a captioner.model.search.Searchable."""

    # How `step` runs one time step: "cell" calls the cell function on the layer's own weights (no copy);
    # "fused" calls the fused layer with a length-1 sequence. Both compute the same function; the cell
    # skips the fused kernel's per-call setup (benchmarks/fp32_paths.py measures the two side by side).
    step_kernel = "cell"

    def __init__(self, cfg: ModelConfig, vocab_size: int, feature_dim: int, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.feature_dim = feature_dim
        E, H, L = cfg.embed_dim, cfg.hidden_dim, cfg.num_layers
        self.inject, self.init_from_image = CONDITIONING_INPUTS[cfg.conditioning]

        self.embed = nn.Embedding(vocab_size, E, padding_idx=pad_id)
        in_dims = [E] + [H] * (L - 1)
        kwargs = {"nonlinearity": "tanh"} if cfg.cell == "rnn" else {}
        self.layers = nn.ModuleList(
            CELL_TYPES[cfg.cell](d, H, num_layers=1, batch_first=True, **kwargs) for d in in_dims
        )
        # P_l: image vector -> layer l's input space (see the module docstring).
        self.image_in = nn.ModuleList(nn.Linear(feature_dim, d) for d in in_dims) if self.inject else None
        # h_0 (and c_0) of every layer from v, for the init conditioning.
        n_init = L * (2 if cfg.cell == "lstm" else 1)
        self.image_init = nn.Linear(feature_dim, n_init * H) if self.init_from_image else None
        # Highway gates between consecutive layers (layer i > 0 gets highway[i - 1]).
        self.highway = nn.ModuleList(
            Highway(H, coupled=cfg.highway_coupled, transform_bias=cfg.highway_bias) for _ in range(L - 1)
        ) if cfg.highway and L > 1 else None
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(H, vocab_size)  # W_hy
        if cfg.tie_weights:
            self.out.weight = self.embed.weight
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[self.embed.padding_idx].zero_()
        for layer in self.layers:
            for name, p in layer.named_parameters():
                if name.startswith("weight_hh"):
                    # Orthogonal W_hh per gate block: singular values 1, so gradients neither vanish
                    # nor explode through the recurrence at the start of training.
                    for block in p.data.chunk(p.shape[0] // p.shape[1]):
                        nn.init.orthogonal_(block)
                elif name.startswith("bias"):
                    nn.init.zeros_(p)
                    if self.cfg.cell == "lstm" and name.startswith("bias_ih"):
                        H = self.cfg.hidden_dim
                        p.data[H:2 * H].fill_(1.0)  # forget gate starts open: remember by default
        nn.init.zeros_(self.out.bias)

    # ---- the image terms, computed once per caption -------------------------------------------------
    def image_inputs(self, features: torch.Tensor) -> list[torch.Tensor]:
        """[(B, in_dim_l)] per layer: P_l v, added to every step's input of layer l."""
        if not self.inject:
            return []
        return [proj(features) for proj in self.image_in]

    def initial_hidden(self, features: torch.Tensor) -> list:
        """Per layer: None (zeros), h_0 (B, H), or (h_0, c_0) for the LSTM."""
        B, H, L = features.shape[0], self.cfg.hidden_dim, self.cfg.num_layers
        if not self.init_from_image:
            zeros = features.new_zeros(B, H)
            return [(zeros, zeros) if self.cfg.cell == "lstm" else zeros for _ in range(L)]
        init = torch.tanh(self.image_init(features)).view(B, -1, H)  # (B, L or 2L, H)
        if self.cfg.cell == "lstm":
            return [(init[:, 2 * i], init[:, 2 * i + 1]) for i in range(L)]
        return [init[:, i] for i in range(L)]

    # ---- teacher forcing: whole sequences through the fused kernels ---------------------------------
    def forward(self, features: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None,
                targets: Targets | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, F) image vectors; inputs (B, T) word ids starting with <start> -> logits (B, T, V).

        Padding after a caption's end is computed but harmless: the recurrence is causal, and the loss
        ignores padded targets. With `mask` (B, T) bool, only the masked positions go through the output
        projection -- the largest matrix multiply -- and the logits come back as (N, V), N = mask.sum().

        With `targets` (the N masked positions' next words and their weights) the result is instead the
        weighted loss of those words, a scalar, computed by captioner.model.output a few hundred tokens at a
        time: the (N, V) logits are never built. Training takes this path (through DDP's forward too).

        With `lengths` (B,) -- each row's real steps, the padding after them -- the recurrence runs as a
        packed sequence: step t multiplies only the rows still running, so a batch of ragged lengths (the
        captions self-critical training samples) costs its real tokens, not B x T. The outputs at the
        real steps are the same as without it; those past a row's length are zeros.
        """
        h, _ = self.run(features, inputs, lengths=lengths)
        h = h[mask] if mask is not None else h
        if targets is not None:
            return token_loss(h.reshape(-1, h.shape[-1]), self.out, targets)
        return self.out(h)

    def run(self, features: torch.Tensor, inputs: torch.Tensor, hidden: list | None = None,
            lengths: torch.Tensor | None = None) -> tuple:
        """Teacher-forced pass over inputs (B, T), starting from `hidden` (None: the initial state).

        Returns the top layer's outputs after dropout (B, T, H) and each layer's hidden state after the
        last step, so that truncated BPTT can continue the next chunk from where this one stopped.
        `lengths` (B,): run each row for its own number of steps (see `forward`); the returned states are
        then each row's state after its own last step.
        """
        x = self.drop(self.embed(inputs))  # (B, T, E)
        if hidden is None:
            hidden = self.initial_hidden(features)
        return self._layers(x, self.image_inputs(features), hidden, lengths)

    def _layers(self, x: torch.Tensor, image_inputs: list[torch.Tensor], hidden: list,
                lengths: torch.Tensor | None = None) -> tuple:
        """x (B, T, E) through every layer: image term added to the input, highway between layers."""
        new_hidden = []
        for i, layer in enumerate(self.layers):
            below = x
            if image_inputs:
                x = x + image_inputs[i].unsqueeze(1)  # (B, 1, d) broadcast over T: once per caption
            y, last = self._run_layer(layer, x, hidden[i], lengths)  # (B, T, H)
            if y.shape[1] == 1:
                # One step: h_t is both the output and the new state. Send the state's own tensor upward,
                # so that one tensor carries both of h_t's paths, up the stack and along time, and its
                # gradient is dL/dh_t (what analysis.gradient_flow measures).
                y = (last[0] if isinstance(last, tuple) else last).unsqueeze(1)
            if self.highway is not None and i > 0:
                y = self.highway[i - 1](below, y)
            x = self.drop(y)
            new_hidden.append(last)
        return x, new_hidden

    def _run_layer(self, layer: nn.Module, x: torch.Tensor, hidden, lengths: torch.Tensor | None = None) -> tuple:
        """One layer over x (B, T, d) from `hidden` -> (outputs (B, T, H), final state in the (B, H) layout)."""
        T = x.shape[1]
        if T == 1 and self.step_kernel == "cell" or _fused_lstm_unavailable(self.cfg.cell):
            return self.cell_loop(layer, x, hidden, lengths)
        if lengths is None or bool((lengths >= T).all()):
            y, last = layer(x, _to_kernel(hidden))
            return y, _from_kernel(last)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        y, last = layer(packed, _to_kernel(hidden))
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=T)
        return y, _from_kernel(last)

    def cell_loop(self, layer: nn.Module, x: torch.Tensor, hidden, lengths: torch.Tensor | None = None) -> tuple:
        """The layer's recurrence one step at a time through the cell function, on the layer's weights.
        With `lengths`, a row keeps its state once its steps are over and outputs zeros, as packed."""
        cell = _CELL_FNS[self.cfg.cell]
        weights = (layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
        outputs = []
        for t in range(x.shape[1]):
            new = cell(x[:, t], hidden, *weights)
            if lengths is not None:
                running = (lengths > t).to(x.device)[:, None]
                if isinstance(new, tuple):
                    new = tuple(torch.where(running, n, h) for n, h in zip(new, hidden))
                else:
                    new = torch.where(running, new, hidden)
            hidden = new
            out = hidden[0] if isinstance(hidden, tuple) else hidden
            outputs.append(out if lengths is None else out * running)
        return torch.stack(outputs, dim=1), hidden

    # ---- one step at a time, for search -------------------------------------------------------------
    def init_state(self, features: torch.Tensor) -> State:
        """The state before the first word: initial hidden states plus the cached image inputs."""
        return self._flatten(self.initial_hidden(features), self.image_inputs(features))

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (B,) previous words -> log-probabilities (B, V) of the next word, new state."""
        h, state = self.step_hidden(tokens, state)
        logits = self.out(h)
        # fp32 log-probabilities even when the GEMMs ran in bf16: beam scores and sampling build on them.
        return torch.log_softmax(logits.float(), dim=-1), state

    def step_hidden(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (B,) previous words -> the top layer's output h_t (B, H), before W_hy, and the new state."""
        hidden, image_inputs = self._unflatten(state)
        x = self.drop(self.embed(tokens).unsqueeze(1))  # (B, 1, E)
        x, hidden = self._layers(x, image_inputs, hidden)
        return x.squeeze(1), self._flatten(hidden, image_inputs)

    def _flatten(self, hidden: list, image_inputs: list[torch.Tensor]) -> State:
        if self.cfg.cell == "lstm":
            return tuple([h for h, _ in hidden] + [c for _, c in hidden] + list(image_inputs))
        return tuple(list(hidden) + list(image_inputs))

    def _unflatten(self, state: State) -> tuple[list, list[torch.Tensor]]:
        L = self.cfg.num_layers
        if self.cfg.cell == "lstm":
            return list(zip(state[:L], state[L:2 * L])), list(state[2 * L:])
        return list(state[:L]), list(state[L:])

    @staticmethod
    def select_state(state: State, index: torch.Tensor) -> State:
        """Pick (and repeat) batch rows of a state: beam search's reorder."""
        return tuple(t.index_select(0, index) for t in state)


class Highway(nn.Module):
    """A highway connection between stacked layers: y = T(x) * H(x) + C(x) * x.

    H(x) is the recurrent layer's output, x the layer's input (the output of the layer below), T the
    transform gate and C the carry gate: C = 1 - T (coupled, the default) or a gate of its own. The
    transform bias starts negative, so a fresh deep stack mostly carries its input upward and gradients
    pass through the stack unchanged -- the idea residual connections later made unconditional.
    """

    def __init__(self, dim: int, coupled: bool = True, transform_bias: float = -2.0):
        super().__init__()
        self.transform = nn.Linear(dim, dim)
        nn.init.constant_(self.transform.bias, transform_bias)
        self.carry = None if coupled else nn.Linear(dim, dim)
        if self.carry is not None:
            nn.init.constant_(self.carry.bias, -transform_bias)  # starts carrying too

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(self.transform(x))
        c = 1.0 - t if self.carry is None else torch.sigmoid(self.carry(x))
        return t * h + c * x


def detach_hidden(hidden: list) -> list:
    """Cut the graph between truncated-BPTT chunks: the state flows forward, its gradient does not."""
    return [tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach() for h in hidden]


def _fused_lstm_unavailable(cell: str) -> bool:
    """True under CPU bf16 autocast on a CPU whose oneDNN has no bf16 LSTM primitive (no native bf16):
    the fused nn.LSTM then fails to build its kernel, so the layer runs through the cell function."""
    return (cell == "lstm" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not _onednn_bf16())


def _onednn_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _from_kernel(last):
    """The kernels' final (1, B, H) state(s) -> (B, H) tensors."""
    if isinstance(last, tuple):
        return tuple(t.squeeze(0) for t in last)
    return last.squeeze(0)


def _to_kernel(hidden):
    """(B, H) tensors -> the (num_layers=1, B, H) layout the fused kernels take."""
    if isinstance(hidden, tuple):
        return tuple(h.unsqueeze(0).contiguous() for h in hidden)
    return hidden.unsqueeze(0).contiguous()
