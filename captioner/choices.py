"""The choices of each setting, listed once: the command line's `choices=`, the config's checks
(captioner.config) and the code that acts on a choice (captioner.precision, captioner.device, the encoder
registry, the decoder's cells and conditioning) all read them from here; tests/test_choices.py keeps them
in agreement. It imports nothing, so `captioner --help` and the config load no torch.

A new choice (a cell, an encoder) is added here and where it is built.
"""

PRECISIONS = ("auto", "fp32", "bf16")  # captioner.precision.resolve
# What every command, the config (train.precision) and the Python API use when no precision is named.
DEFAULT_PRECISION = "auto"
DEVICES = ("auto", "cpu", "cuda")  # captioner.device.resolve_device (which also takes "cuda:N")
CELLS = ("rnn", "lstm", "gru")  # captioner.model.decoder
CONDITIONING = ("inject", "init", "both")  # captioner.model.decoder: W_ih v at every step, h_0 from v, both
POOLINGS = ("mean", "max", "meanmax")  # captioner.vision.encoders.registry.build_encoder
# captioner.vision.encoders (lite.py, resnet.py register them)
ENCODERS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet101", "resnet152")
