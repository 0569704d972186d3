"""Caption metrics as the MS-COCO caption evaluation reports them: BLEU-1..4, ROUGE-L and CIDEr-D.

The scores come from `pycocoevalcap` (the packaged coco-caption code): its `Bleu`, `Rouge` and
`Cider` scorers are pure Python. Its `Cider` is CIDEr-D as used on the COCO leaderboard (clipped
n-gram counts, a Gaussian length penalty with sigma 6, x10), with document frequencies taken from
the references being scored (so scores of different subsets are not comparable). ROUGE-L is
coco-caption's (LCS F-measure with beta 1.2, best reference).

Tokenization decides the numbers. COCO's is Stanford's PTBTokenizer (Java, shipped inside
pycocoevalcap) followed by punctuation removal: `tokenizer="ptb"` runs it and needs `java` on PATH.
`"simple"` is a pure-Python stand-in for it (lowercase, split off punctuation and clitics, drop
punctuation); `"auto"` (the default) uses PTB when `java` is found, else `simple` with a warning.
The tokenizer used is part of the result.
"""

import logging
import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import precook
from pycocoevalcap.rouge.rouge import Rouge

logger = logging.getLogger(__name__)

TOKENIZERS = ("auto", "ptb", "simple")
_CLITIC = re.compile(r"(n't|'s|'re|'ll|'ve|'m|'d)\b")
_TOKEN = re.compile(r"n't|[a-z0-9]+(?:[-./][a-z0-9]+)*|'[a-z]+")


def simple_tokenize(text: str) -> str:
    """PTB-like tokens without Java: "A dog's ball, isn't it?" -> "a dog 's ball is n't it"."""
    text = _CLITIC.sub(r" \1", text.lower().replace("\u2019", "'"))
    return " ".join(_TOKEN.findall(text))


def resolve_tokenizer(tokenizer: str = "auto") -> str:
    """"ptb" or "simple"; "ptb" without `java` on PATH raises, "auto" falls back with a warning."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    has_java = shutil.which("java") is not None
    if tokenizer == "ptb" and not has_java:
        raise RuntimeError(
            "the PTB tokenizer runs Stanford CoreNLP with Java, and `java` is not on PATH: install a Java runtime "
            "(e.g. apt-get install default-jre-headless) or use the pure-Python tokenizer (--caption_tokenizer simple)"
        )
    if tokenizer == "auto":
        if not has_java:
            logger.warning("`java` is not on PATH: caption metrics use the pure-Python tokenizer, not COCO's PTBTokenizer; "
                           "scores can differ slightly from published COCO figures")
        return "ptb" if has_java else "simple"
    return tokenizer


def tokenize(texts_per_item: dict, tokenizer: str) -> dict:
    """{id: [text, ...]} -> {id: [tokenized text, ...]} with the named ("ptb" or "simple") tokenizer."""
    if tokenizer == "simple":
        return {k: [simple_tokenize(t) for t in texts] for k, texts in texts_per_item.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # PTBTokenizer reads one line per caption: a newline inside a caption would shift every later one.
    return PTBTokenizer().tokenize({k: [{"caption": " ".join(t.split())} for t in texts] for k, texts in texts_per_item.items()})


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str = "auto") -> dict:
    """Corpus BLEU-1..4, ROUGE-L and CIDEr-D of one prediction per item against its references.

    Returns the scores, the tokenizer used, and `per_item` lists (bleu4, rouge_l, cider_d) in order.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists; pass one list per prediction")
    if not predictions:
        raise ValueError("no predictions to score")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every prediction needs at least one reference")
    used = resolve_tokenizer(tokenizer)
    res = tokenize({i: [p] for i, p in enumerate(predictions)}, used)
    gts = tokenize({i: list(refs) for i, refs in enumerate(references)}, used)
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_items = Rouge().compute_score(gts, res)
    cider, cider_items = Cider().compute_score(gts, res)
    scores = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores.update(rouge_l=float(rouge), cider_d=float(cider), tokenizer=used)
    scores["per_item"] = {"bleu4": [float(x) for x in bleu_items[3]], "rouge_l": [float(x) for x in rouge_items],
                          "cider_d": [float(x) for x in cider_items]}
    return scores


class CiderD:
    """CIDEr-D with n-gram document frequencies fixed by a corpus of reference lists (`corpus`, one list per
    image), as a reward: a caption's score does not depend on the other captions scored with it.

    The formula is pycocoevalcap's `Cider` (tf-idf n-gram vectors for n = 1..4, counts clipped to the
    reference's, a Gaussian length penalty with sigma 6, the mean over n and references, x10) on
    `simple_tokenize`d text; scored against the corpus it was built from, it gives `Cider`'s per-item scores.
    Reference vectors are cached per reference list, so scoring many samples of one image costs little.
    """

    def __init__(self, corpus: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0):
        if not corpus:
            raise ValueError("CiderD needs a corpus of reference lists to take document frequencies from")
        self.n, self.sigma = n, sigma
        self.document_frequency = Counter(
            ngram for refs in corpus for ngram in {g for ref in refs for g in precook(simple_tokenize(ref), n)})
        self.log_corpus_size = math.log(float(len(corpus)))
        self._references = {}

    def _vector(self, text: str):
        """(one {ngram: tf-idf} per n, their norms, a length) of a caption. The length is the number of
        bigrams, as pycocoevalcap counts it: only length differences enter the penalty, and they are the same."""
        vectors, norms, length = [{} for _ in range(self.n)], [0.0] * self.n, 0
        for ngram, count in precook(simple_tokenize(text), self.n).items():
            k = len(ngram) - 1
            weight = count * (self.log_corpus_size - math.log(max(1.0, self.document_frequency[ngram])))
            vectors[k][ngram] = weight
            norms[k] += weight * weight
            length += count if k == 1 else 0
        return vectors, [math.sqrt(x) for x in norms], length

    def score(self, candidate: str, references: Sequence[str]) -> float:
        """CIDEr-D of one caption against its image's references."""
        key = tuple(references)
        if key not in self._references:
            self._references[key] = [self._vector(r) for r in references]
        vectors, norms, length = self._vector(candidate)
        total = 0.0
        for ref_vectors, ref_norms, ref_length in self._references[key]:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                overlap = sum(min(w, ref_vectors[k].get(g, 0.0)) * ref_vectors[k].get(g, 0.0) for g, w in vectors[k].items())
                if norms[k] and ref_norms[k]:
                    overlap /= norms[k] * ref_norms[k]
                total += overlap * penalty
        return 10.0 * total / (self.n * len(references))

    def __call__(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """CIDEr-D of each candidate against its reference list."""
        if len(candidates) != len(references):
            raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference lists; pass one list per candidate")
        return [self.score(c, refs) for c, refs in zip(candidates, references)]
