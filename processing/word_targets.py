"""Which content words a photo's captions use: the target of the training-only words loss.

A photo's target is the set of content words (stop words out) in all of its reference captions,
over a vocabulary of the words used at least `min_count` times in the training captions. Predicting
it from the visual tokens (multi-label, as VirTex's token classification and attribute-boosted
captioners do) gives the vision tower a direct signal, where the caption loss alone lets a
from-scratch decoder learn the language prior and ignore the picture.
"""

import re
from collections import Counter
from collections.abc import Iterable

_WORD = re.compile(r"[a-z]+")

# Function words and words that every caption uses: they say nothing about a particular photo.
STOP_WORDS = frozenset(
    """a an the and or but of in on at to for from with without by into onto over under up down out off
    is are was were be been being am has have had do does did it its it's this that these those there
    here he she they them his her their him its one two three some another other while as near next
    front behind top through across along around against each who which what where very someone something
    """.split()
)


def content_words(text: str) -> set[str]:
    """Lower-cased alphabetic words of `text` that are not stop words."""
    return {w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS and len(w) > 1}


def word_vocabulary(texts: Iterable[str], min_count: int = 5) -> list[str]:
    """Content words used at least `min_count` times in `texts` (each caption counts a word once),
    most frequent first."""
    counts = Counter(w for t in texts for w in content_words(t))
    return [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]


def word_targets(references: Iterable[str], index: dict[str, int]) -> list[int]:
    """Vocabulary ids of the content words in any of `references` (sorted)."""
    return sorted({index[w] for t in references for w in content_words(t) if w in index})
