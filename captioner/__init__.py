"""captioner: a pretrained CNN encodes an image into a vector v; an RNN decoder that sees v at every
step writes the caption.

    from captioner import Captioner
    cap = Captioner.from_pretrained()            # the shipped ensemble; a name, a checkpoint path or a list
    cap("photo.jpg")                             # -> "a dog runs through the grass"
    captioner.list_pretrained()                  # the shipped models' names (get_pretrained(NAME): the details)

Data flows one way, one folder per stage, and no module imports a higher stage (tests/test_layout.py):

    choices, config, precision, device      the settings: each setting's choices listed once (choices.py)
    data/       records from any dataset layout, the vocabulary, the held-out dev slice
    vision/     images -> encoders/ (CNNs by name) -> the feature cache (features.py)
    model/      decoder.py (the RNN), ensemble.py; decoding.py: Decoding, how a caption is decoded (beam,
                length, n-best, length penalty, Guards, Rerank); search.py drives any Searchable
                (greedy, beam, sampling) under constraints.py's guards; rerank.py reranks the beam with
                neighbours.py's index and scores confidence.py's confidence
    eval/       metrics (BLEU, METEOR, ROUGE-L, CIDEr), fluency, hallucination, the gallery page
    analysis/   gradient flow, interpretable cells, training curves
    checkpoint.py, pretrained/              the file format, the model rebuild, the shipped models
    train/      the training loop and its phases (cross-entropy, self-critical)
    inference.py  Captioner: checkpoint -> encoder + decoder + vocabulary -> captions, given a Decoding
    serve/      the HTTP app; batching.py groups requests by their Decoding
    cli.py, commands/   the `captioner` command: cli.py parses (caption, evaluate and serve share the
                model and decoding options, made into one Decoding by cli.decoding_of), commands/ runs

A caption's path: `captioner caption` -> cli.decoding_of(args) -> Captioner.caption_images(paths,
decoding) -> encoder -> caption_features -> constrained(decoding.guards) -> search.beam_search(...,
decoding) -> rerank (decoding.rerank) -> the n-best.

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
