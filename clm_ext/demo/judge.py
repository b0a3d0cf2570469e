"""The demo's judges: VADER's compound sentiment score (the reward the preference pairs come from) and
TextBlob's polarity (a held-out judge the training never sees), both in [-1, 1] (1 = most positive).

Both are fixed lexicons and rules, independent of the model being trained. VADER is the training signal, so
a gain that only games VADER's lexicon would show as a gap between the two judges. TextBlob's `.sentiment`
uses the lexicon bundled in its package (no corpus download).
"""
import math
from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


@lru_cache(maxsize=1)
def _analyzer() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


def reward(text: str) -> float:
    """VADER compound score of `text`."""
    if not isinstance(text, str):
        raise TypeError(f"reward: text must be a str, got {type(text).__name__}")
    return _analyzer().polarity_scores(text)["compound"]


def rewards(texts: list) -> list:
    return [reward(t) for t in texts]


def heldout_reward(text: str) -> float:
    """TextBlob polarity of `text` (pattern lexicon)."""
    from textblob import TextBlob

    if not isinstance(text, str):
        raise TypeError(f"heldout_reward: text must be a str, got {type(text).__name__}")
    return TextBlob(text).sentiment.polarity


def heldout_rewards(texts: list) -> list:
    return [heldout_reward(t) for t in texts]


def mean_and_stderr(values: list) -> tuple:
    """Sample mean and its standard error (0 for a single value)."""
    if not values:
        raise ValueError("mean_and_stderr: values is empty")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
