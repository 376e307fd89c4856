"""captioner: a pretrained CNN encodes an image into a vector v; an RNN decoder that sees v at every
step writes the caption.

Data flows one way: data (records, vocabulary) -> features (encoders, cache) -> model (decoder)
-> search (greedy, beam, sampling) -> metrics.
"""

__version__ = "0.1.0"
