"""captioner: a pretrained CNN encodes an image into a vector v; an RNN decoder that sees v at every
step writes the caption.

    from captioner import Captioner
    cap = Captioner.from_pretrained()            # the shipped ensemble; a name, a checkpoint path or a list
    cap("photo.jpg")                             # -> "a dog runs through the grass"
    captioner.list_pretrained()                  # the shipped models' names (get_pretrained(NAME): the details)

Data flows one way: data (records, vocabulary) -> features (encoders, cache) -> model (decoder)
-> search (greedy, beam, sampling) -> metrics.

Importing the package imports no torch: `Captioner`, `CaptionerError`, `Decoding`, `Guards`, `Rerank` and the shipped
models' list are loaded on first use, so the
`captioner` command answers --help at once.
"""

__version__ = "0.1.0"

__all__ = ["Captioner", "CaptionerError", "Decoding", "Guards", "Rerank", "get_pretrained", "list_pretrained", "__version__"]


def __getattr__(name: str):
    if name == "Captioner":
        from captioner.inference import Captioner

        return Captioner
    if name == "CaptionerError":
        from captioner.errors import CaptionerError

        return CaptionerError
    if name in ("Decoding", "Guards", "Rerank"):
        from captioner.model import decoding

        return getattr(decoding, name)
    if name in ("list_pretrained", "get_pretrained"):
        from captioner import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + ["Captioner", "CaptionerError", "Decoding", "Guards", "Rerank", "get_pretrained",
                                     "list_pretrained"])
