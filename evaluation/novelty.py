"""ROUGE novelty (the paper's section 4): does a model write new text or copy its training texts?

For every generated text: the highest ROUGE-1 and ROUGE-L F1 against all training texts
(`rouge_score`, no stemming), and over all generated texts distinct-1/2 (unique n-grams / n-grams).

Comparing each output with 30,000 training texts one by one would cost 30,000 LCS computations
per output. `RougeNovelty` keeps an inverted index (word -> training texts holding it, with
counts), so one pass over the output's words gives the unigram overlap, hence the exact ROUGE-1
F1 (2 * overlap / (len_a + len_b)), with every training text that shares a word (the others score
0). ROUGE-L F1 (2 * LCS / (len_a + len_b)) is never above ROUGE-1 F1 because an LCS is a common
unigram multiset: the LCS is computed for candidates in descending ROUGE-1 order and stops at the
first whose ROUGE-1 F1 cannot beat the best ROUGE-L so far, so the maximum is exact.
"""

from collections import Counter
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer, tokenizers


class RougeNovelty:
    def __init__(self, corpus: Sequence[str]):
        if not corpus:
            raise ValueError("RougeNovelty needs at least one training text")
        self.corpus = list(corpus)
        self.tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self.scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], tokenizer=self.tokenizer)
        postings: dict[str, tuple[list[int], list[int]]] = {}
        lengths = []
        for i, text in enumerate(self.corpus):
            tokens = self.tokenizer.tokenize(text)
            lengths.append(len(tokens))
            for word, count in Counter(tokens).items():
                ids, counts = postings.setdefault(word, ([], []))
                ids.append(i)
                counts.append(count)
        self.lengths = np.array(lengths, dtype=np.float64)
        self.postings = {w: (np.array(ids), np.array(counts, dtype=np.float64)) for w, (ids, counts) in postings.items()}
        self._memo: dict[str, dict] = {}
        self.lcs_computed = 0  # LCS comparisons made, for the report: far fewer than len(corpus) per text

    def best(self, text: str) -> dict:
        """{"rouge1": max F1, "rougeL": max F1, "rouge1_match" / "rougeL_match": index of a best training
        text (None when nothing is shared), "candidates": training texts sharing a word with `text`}."""
        if text in self._memo:
            return self._memo[text]
        tokens = self.tokenizer.tokenize(text)
        overlap = np.zeros(len(self.corpus))
        for word, count in Counter(tokens).items():
            if word in self.postings:
                ids, counts = self.postings[word]
                overlap[ids] += np.minimum(counts, count)
        candidates = np.flatnonzero(overlap)
        result = {"rouge1": 0.0, "rougeL": 0.0, "rouge1_match": None, "rougeL_match": None, "candidates": int(candidates.size)}
        if candidates.size:
            f1 = 2 * overlap[candidates] / (len(tokens) + self.lengths[candidates])
            order = candidates[np.argsort(-f1, kind="stable")]
            bounds = np.sort(f1)[::-1]
            top = self.scorer.score(self.corpus[order[0]], text)
            result.update(rouge1=top["rouge1"].fmeasure, rouge1_match=int(order[0]), rougeL=top["rougeL"].fmeasure, rougeL_match=int(order[0]))
            self.lcs_computed += 1
            for index, bound in zip(order[1:], bounds[1:]):
                if bound <= result["rougeL"]:
                    break
                score = self.scorer.score(self.corpus[index], text)["rougeL"].fmeasure
                self.lcs_computed += 1
                if score > result["rougeL"]:
                    result.update(rougeL=score, rougeL_match=int(index))
        self._memo[text] = result
        return result


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over `texts` (lowercased words; 0.0 when there is none)."""
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
    grams = [tuple(t[i:i + n]) for t in map(tokenizer.tokenize, texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def novelty_scores(texts: Sequence[str], corpus: Sequence[str] | RougeNovelty) -> dict:
    """Means (and medians) of the per-text maxima, the share of texts copied whole (ROUGE-L 1.0), and
    distinct-1/2; `per_item` holds each text's maxima and best-matching training text."""
    index = corpus if isinstance(corpus, RougeNovelty) else RougeNovelty(corpus)
    best = [index.best(t) for t in texts]
    r1, rl = np.array([b["rouge1"] for b in best]), np.array([b["rougeL"] for b in best])
    return {
        "rouge1_max_mean": float(r1.mean()), "rougeL_max_mean": float(rl.mean()),
        "rouge1_max_median": float(np.median(r1)), "rougeL_max_median": float(np.median(rl)),
        "copied": float((rl >= 1.0 - 1e-9).mean()),
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "num_texts": len(texts), "num_training_texts": len(index.corpus),
        "per_item": [{"rouge1": b["rouge1"], "rougeL": b["rougeL"],
                      "closest_training_text": index.corpus[b["rougeL_match"]] if b["rougeL_match"] is not None else None}
                     for b in best],
    }
