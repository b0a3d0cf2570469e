"""The demo's reward judge: VADER's compound sentiment score, in [-1, 1] (1 = most positive).

VADER is a fixed lexicon and rule set, independent of the model being trained, so the reward cannot be
gamed by the model's own representation; the training sees it only through the preference pairs.
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
