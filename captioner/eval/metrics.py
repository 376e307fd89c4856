"""Caption metrics exactly as the COCO caption evaluation computes them, plus an nltk cross-check.

    references {key: [caption, ...]}, hypotheses {key: caption}
      -> tokenize_for_eval (Stanford PTBTokenizer, punctuation removed, lower case)
      -> pycocoevalcap's Bleu(4), Meteor(), Rouge(), Cider() called directly
      -> totals x100 (as papers report them) and per-image scores.

COCOEvalCap itself is not used because it needs a pycocotools COCO object; it only chains the same calls.

Java runs the PTB tokenizer and METEOR. Without Java (shutil.which("java") is None) a pure-Python tokenizer
reproducing the PTB rules that occur in captions stands in, BLEU / ROUGE-L / CIDEr are computed as usual
and METEOR is skipped with one warning. If METEOR's JVM fails, the scores are reported without it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
METRIC_KEYS = BLEU_KEYS + ("METEOR", "ROUGE-L", "CIDEr")
METEOR_TIMEOUT_S = 600  # a watchdog kills a METEOR JVM that stops answering, so scoring never hangs

# The tokens pycocoevalcap's PTBTokenizer drops after tokenizing (its PUNCTUATIONS list). It tokenizes with
# -lowerCase, so brackets come out as "-lrb-" etc. and survive the upper-case "-LRB-" entries: we match that.
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])


@dataclass
class Scores:
    """Corpus scores x100 (`totals`) and each image's scores x100 (`per_image[key][metric]`).

    A metric that could not be computed (METEOR without Java) is absent from both. `scores["CIDEr"]`
    reads `totals`.
    """

    totals: dict[str, float]
    per_image: dict[Hashable, dict[str, float]] = field(repr=False)

    def __getitem__(self, metric: str) -> float:
        return self.totals[metric]


# ---- tokenization ---------------------------------------------------------------------------------------

def java_available() -> bool:
    return shutil.which("java") is not None


def tokenize_for_eval(captions: Mapping[Hashable, list[str]], use_java: bool | None = None
                      ) -> dict[Hashable, list[str]]:
    """{key: [caption]} -> {key: [tokens joined by spaces]}, as the COCO evaluation tokenizes.

    use_java None: the Stanford PTBTokenizer through pycocoevalcap when Java is installed, else (or if the
    Java run fails) `ptb_tokenize`, the pure-Python equivalent.
    """
    if use_java is None:
        use_java = java_available()
    if use_java:
        try:
            return _java_tokenize(captions)
        except (OSError, RuntimeError) as exc:
            log.warning("the Java PTB tokenizer failed (%s); using the pure-Python tokenizer", exc)
    return {key: [ptb_tokenize(c) for c in caps] for key, caps in captions.items()}


def _java_tokenize(captions: Mapping[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # pycocoevalcap splits the JVM's output by line: a caption with a line break would shift all others.
    wrapped = {key: [{"caption": " ".join(c.splitlines())} for c in caps] for key, caps in captions.items()}
    with _stderr_to_log():  # the JVM prints "PTBTokenizer tokenized N tokens at ..." on stderr
        out = PTBTokenizer().tokenize(wrapped)
    counts = {key: len(caps) for key, caps in captions.items() if caps}
    if {key: len(caps) for key, caps in out.items()} != counts:
        raise RuntimeError("its output does not line up with the captions given")
    return out


@contextlib.contextmanager
def _stderr_to_log():
    """Send what child processes write to file descriptor 2 to the debug log instead of the terminal."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("java: %s", text)


_CLITICS = ("n't", "'s", "'re", "'ll", "'d", "'m", "'ve")
_CLITIC = re.compile(r"^(.+?)(%s)$" % "|".join(_CLITICS))
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "'tis": ("'t", "is")}
# Words PTB keeps with their final period: a few abbreviations, initials and acronyms ("a.", "u.s.").
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "mt.", "jr.", "sr.", "prof.", "etc.", "vs.", "inc.",
                  "co.", "ltd.", "ave."}
_ACRONYM = re.compile(r"^([a-z]\.)+$")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_UNICODE = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2013": "--", "\u2014": "--"}


def ptb_tokenize(caption: str) -> str:
    """One caption -> its tokens joined by spaces, following PTBTokenizer -lowerCase then PUNCTUATIONS.

    Covers what captions contain: sentence punctuation, brackets, quotes, clitics ("man's" -> "man 's",
    "doesn't" -> "does n't"), hyphenated words kept whole, numbers with , . : kept whole, $ # % split off,
    abbreviations and acronyms keeping their period. Rare PTB rules (emoticons, "?!" runs, html) differ.
    """
    text = caption.lower()
    for char, repl in _UNICODE.items():
        text = text.replace(char, repl)
    for char, repl in _BRACKETS.items():
        text = text.replace(char, f" {repl} ")
    # Separators that never stay inside a token: double quotes, ellipses, dashes, and , ; : ! ? when not
    # between digits (1,000  5:30 stay whole).
    text = text.replace('"', " ").replace("...", " ").replace("--", " ")
    text = re.sub(r"(?<!\d)[,:]|[,:](?!\d)|[;!?]", " ", text)
    text = re.sub(r"([$#])(?=\d)", r" \1 ", text)  # "$5" -> "$ 5", "#1" -> "# 1" (but "#tag" stays)
    text = re.sub(r"(?<=\d)%", " %", text).replace("=", " = ")
    tokens = []
    for chunk in text.split():
        tokens.extend(_ptb_word(chunk))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def _ptb_word(chunk: str) -> list[str]:
    """One whitespace-separated chunk (already lower case, separators removed) -> PTB tokens."""
    if chunk in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[chunk])
    if chunk in _BRACKETS.values() or chunk == "'n'":  # "slip 'n' slide" keeps its quoted n
        return [chunk]
    # Quotes and dashes at the edges are punctuation, except a clitic's own apostrophe ("'s" alone).
    if chunk not in _CLITICS:
        chunk = chunk.lstrip("'`-")
    chunk = chunk.rstrip("`-")
    while chunk.endswith("'") and not chunk.endswith("n't"):
        chunk = chunk[:-1]
    # A final period is a sentence end unless the word is an abbreviation or an acronym.
    if chunk.endswith(".") and chunk not in _ABBREVIATIONS and not _ACRONYM.match(chunk):
        chunk = chunk.rstrip(".")
    if not chunk:
        return []
    clitic = _CLITIC.match(chunk)
    if clitic:
        return [clitic.group(1), clitic.group(2)]
    return [chunk]


# ---- scoring ----------------------------------------------------------------------------------------------

class CaptionScorer:
    """Scores caption sets; holds one METEOR JVM for all calls until `close()` (or the `with` block ends).

    Starting METEOR costs a few seconds: share one scorer when scoring repeatedly (every epoch, tests).
    """

    def __init__(self, meteor: bool = True, use_java: bool | None = None):
        self.use_java = java_available() if use_java is None else use_java
        self._meteor = None
        self._meteor_wanted = meteor
        if meteor and not self.use_java:
            log.warning("Java not found: METEOR is skipped and a pure-Python PTB tokenizer is used "
                        "(install a Java runtime for the official METEOR and tokenizer)")
            self._meteor_wanted = False

    @property
    def meteor(self):
        """The running METEOR scorer (pycocoevalcap's Meteor, which holds the JVM); None while none runs."""
        return self._meteor

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, references: Mapping[Hashable, list[str]], hypotheses: Mapping[Hashable, str]) -> Scores:
        _check_inputs(references, hypotheses)
        keys = list(references)
        # One tokenizer run (one JVM) for both sides; ("ref", key) / ("hyp", key) keep them apart.
        joint = {("ref", k): list(references[k]) for k in keys}
        joint.update({("hyp", k): [hypotheses[k]] for k in keys})
        tokens = tokenize_for_eval(joint, use_java=self.use_java)
        gts = {k: tokens[("ref", k)] for k in keys}
        res = {k: tokens[("hyp", k)] for k in keys}
        return self.score_tokenized(gts, res)

    def score_tokenized(self, gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]) -> Scores:
        """Already tokenized input in pycocoevalcap's own format: {key: [refs]}, {key: [the hypothesis]}."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        keys = list(gts)
        totals: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {}
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
            bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
            for name, total, each in zip(BLEU_KEYS, bleu, bleu_per_image):
                totals[name], per_metric[name] = total, list(each)
            meteor = self._meteor_score(gts, res)
            if meteor is not None:
                totals["METEOR"], per_metric["METEOR"] = meteor
            totals["ROUGE-L"], rouge_each = Rouge().compute_score(gts, res)
            per_metric["ROUGE-L"] = list(rouge_each)
            totals["CIDEr"], cider_each = Cider().compute_score(gts, res)
            per_metric["CIDEr"] = list(cider_each)
        order = [m for m in METRIC_KEYS if m in totals]
        totals = {m: 100.0 * float(totals[m]) for m in order}
        per_image = {k: {m: 100.0 * float(per_metric[m][i]) for m in order} for i, k in enumerate(keys)}
        return Scores(totals=totals, per_image=per_image)

    # ---- METEOR: one JVM, closed for sure ------------------------------------------------------------
    def _meteor_score(self, gts, res) -> tuple[float, list[float]] | None:
        if not self._meteor_wanted:
            return None
        try:
            if self._meteor is None:
                from pycocoevalcap.meteor.meteor import Meteor

                self._meteor = Meteor()
            # The watchdog kills a stuck JVM: its pipe then closes, and compute_score fails instead of hanging.
            watchdog = threading.Timer(METEOR_TIMEOUT_S, self._meteor.meteor_p.kill)
            watchdog.start()
            try:
                total, each = self._meteor.compute_score(gts, res)
            finally:
                watchdog.cancel()
            if not math.isfinite(total):
                raise ValueError(f"score {total}")
            return total, each
        except Exception as exc:  # noqa: BLE001 - any METEOR failure must not cost the other metrics
            stderr = self._meteor_stderr()
            log.warning("METEOR failed (%s%s); reporting the other metrics without it",
                        exc, f": {stderr}" if stderr else "")
            self.close()
            self._meteor_wanted = False
            return None

    def _meteor_stderr(self) -> str:
        """The JVM's last stderr line once it has exited (its error message); "" while it runs."""
        proc = getattr(self._meteor, "meteor_p", None)
        if proc is None or proc.poll() is None:
            return ""  # still running: reading its stderr would block
        lines = proc.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def close(self) -> None:
        """Stop the METEOR JVM and reap it (no zombie). Safe to call twice."""
        meteor, self._meteor = self._meteor, None
        if meteor is None:
            return
        proc = meteor.meteor_p
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()
        proc.kill()
        proc.wait(timeout=30)
        for pipe in (proc.stdout, proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                pipe.close()
        # Meteor.__del__ takes its lock before killing: a compute_score that failed midway left it held, and
        # __del__ would then block forever at garbage collection. Release it; the rest of __del__ is a no-op
        # on the reaped process.
        if meteor.lock.locked():
            meteor.lock.release()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def score_captions(references: Mapping[Hashable, list[str]], hypotheses: Mapping[Hashable, str],
                   meteor: bool = True) -> Scores:
    """COCO caption metrics x100: BLEU-1..4, METEOR, ROUGE-L, CIDEr (totals and per image).

    references {key: [caption, ...]}, hypotheses {key: caption} with the same keys; captions are raw text.
    """
    with CaptionScorer(meteor=meteor) as scorer:
        return scorer.score(references, hypotheses)


def _check_inputs(references: Mapping, hypotheses: Mapping) -> None:
    if not references:
        raise CaptionerError("no references to score against")
    missing = references.keys() - hypotheses.keys()
    extra = hypotheses.keys() - references.keys()
    if missing or extra:
        example = next(iter(missing or extra))
        raise CaptionerError(
            f"hypotheses and references differ on {len(missing) + len(extra)} images "
            f"({len(missing)} without a hypothesis, {len(extra)} without references; e.g. {example!r})")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise CaptionerError(f"{len(empty)} images have no reference caption (e.g. {empty[0]!r})")
    not_text = [k for k, h in hypotheses.items() if not isinstance(h, str)]
    if not_text:
        raise CaptionerError(f"{len(not_text)} hypotheses are not one string each (e.g. {not_text[0]!r})")


# ---- cross-check and display ------------------------------------------------------------------------------

def nltk_corpus_bleu(references: Mapping[Hashable, list[str]], hypotheses: Mapping[Hashable, str],
                     use_java: bool | None = None) -> dict[str, float]:
    """BLEU-1..4 x100 from nltk's corpus_bleu on the same PTB tokens: an independent implementation."""
    from nltk.translate.bleu_score import corpus_bleu

    _check_inputs(references, hypotheses)
    keys = list(references)
    joint = {("ref", k): list(references[k]) for k in keys}
    joint.update({("hyp", k): [hypotheses[k]] for k in keys})
    tokens = tokenize_for_eval(joint, use_java=use_java)
    refs = [[r.split() for r in tokens[("ref", k)]] for k in keys]
    hyps = [tokens[("hyp", k)][0].split() for k in keys]
    weights = [tuple([1.0 / n] * n) for n in range(1, 5)]  # cumulative BLEU-n: uniform over 1..n-grams
    return {name: 100.0 * float(corpus_bleu(refs, hyps, weights=w)) for name, w in zip(BLEU_KEYS, weights)}


def format_table(scores: Mapping[str, float] | Scores, n_images: int) -> str:
    """An aligned two-column table; metrics that are missing (METEOR without Java) say so."""
    totals = scores.totals if isinstance(scores, Scores) else scores
    names = list(METRIC_KEYS) + [m for m in totals if m not in METRIC_KEYS]
    width = max(len(m) for m in names)
    lines = [f"{'metric':<{width}}  {'score':>6}   ({n_images} images)"]
    for m in names:
        value = f"{totals[m]:6.2f}" if m in totals else f"{'-':>6}   (not computed)"
        lines.append(f"{m:<{width}}  {value}")
    return "\n".join(lines)
