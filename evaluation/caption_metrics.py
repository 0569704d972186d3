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
import re
import shutil
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
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
