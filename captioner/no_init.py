"""Building modules whose every weight is loaded next, without first drawing random ones.

    with without_random_init():
        model = CaptionDecoder(cfg, ...)      # torch.nn.init's initialisers do nothing in here
    model.load_state_dict(stored)             # ... so every weight must come from `stored`

The decoder's orthogonal W_hh blocks (a QR factorisation each) and the layers' and the CNN's default
initialisation cost a cold start more than loading the weights that replace them. Only for models whose
loading refuses a missing weight (strict load_state_dict, captioner.checkpoint.load_state).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# torch.nn.init's in-place initialisers: what every torch.nn layer's reset_parameters calls.
INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                "sparse_")


@contextmanager
def without_random_init():
    """Modules built inside keep the values torch.empty gives them instead of drawing random ones. The
    initialisers are swapped for no-ops only while the block runs, as Hugging Face's `no_init_weights`
    does, and restored however it ends. (Not a torch.device("meta") build: initialising on the meta
    device imports torch's compiler stack, which costs more than the initialisation it saves.)"""
    saved = {name: getattr(torch.nn.init, name) for name in INITIALISERS if hasattr(torch.nn.init, name)}
    try:
        for name in saved:
            setattr(torch.nn.init, name, _keep)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor
