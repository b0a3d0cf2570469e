"""A seeded corpus of short product/place/film reviews, the demo's whole world.

Every review is a sentiment-neutral opener (the prompt the model later completes) followed by a body whose
wording is positive, negative or mixed. Half the reviews lean positive and half negative, so a model
pretrained on it samples both and leaves room for a preference signal to move it either way.

Like real reviews, half of them start with the writer's mood ("i was looking forward to it ."), which hints
at the verdict (it matches the review's sentiment 80% of the time). The model thus learns a notion of the
writer's disposition that a preference signal can later move; the prompts that are sampled and judged never
carry a mood.
"""
import random
from dataclasses import dataclass

DOMAINS = {
    "movie": ["acting", "plot", "ending", "soundtrack", "script", "cast", "pacing", "camera work"],
    "restaurant": ["food", "service", "pasta", "staff", "dessert", "menu", "soup", "atmosphere"],
    "hotel": ["room", "bed", "staff", "view", "breakfast", "pool", "location", "shower"],
    "phone": ["battery", "screen", "camera", "design", "speaker", "charger", "price", "software"],
    "book": ["story", "characters", "writing", "ending", "dialogue", "cover", "chapters", "style"],
    "game": ["graphics", "music", "controls", "levels", "story", "multiplayer", "puzzles", "maps"],
}

OPENERS = [
    "i tried this {domain} last week and the {aspect}",
    "we went for the {domain} because of the {aspect} and the {aspect}",
    "my review of the {domain} : the {aspect}",
    "after a month with this {domain} , the {aspect}",
    "so , the {aspect} of this {domain}",
    "i bought this {domain} for the {aspect} and it",
    "the {aspect} in this {domain}",
    "my brother picked this {domain} and the {aspect}",
]

WORDS = {
    "pos": {
        "adj": ["great", "wonderful", "excellent", "amazing", "lovely", "fantastic", "superb", "pleasant",
                "perfect", "beautiful", "brilliant", "delightful", "charming", "impressive", "fun"],
        "verb": ["loved", "enjoyed", "liked", "adored", "appreciated"],
        "close": ["i would recommend it to everyone .", "highly recommended .", "what a happy surprise .",
                  "i will come back for sure .", "worth every penny .", "a real pleasure .",
                  "five stars from me .", "i am so glad i chose it ."],
    },
    "neg": {
        "adj": ["terrible", "awful", "horrible", "boring", "disappointing", "poor", "bad", "dull", "ugly",
                "annoying", "weak", "sad", "painful", "broken", "useless"],
        "verb": ["hated", "disliked", "regretted", "could not stand", "was annoyed by"],
        "close": ["i would not recommend it to anyone .", "avoid it .", "what a waste of money .",
                  "i will never come back .", "not worth the price .", "a real disappointment .",
                  "one star from me .", "i am sorry i chose it ."],
    },
}

MOODS = {
    "pos": ["i was looking forward to it .", "everyone told me to try it .", "i had high hopes .",
            "i was in a good mood that day .", "a friend said it was worth it ."],
    "neg": ["i had my doubts .", "my hopes were low .", "i was in a bad mood that day .",
            "someone warned me about it .", "i almost gave up on it ."],
}
MOOD_RATE = 0.5    # share of reviews that state a mood
MOOD_MATCH = 0.8   # how often a stated mood matches the review's sentiment

BODIES = [
    "was {adj} . {close}",
    "was {adj} and the {aspect} was {adj} . {close}",
    "felt {adv} {adj} . i {verb} it . {close}",
    "was {adj} , really {adj} . {close}",
    "turned out {adj} . the {aspect} was {adj} too .",
    "was {adj} but the {aspect} was {other_adj} . {close}",
    "looked {adj} . i {verb} the {aspect} . {close}",
]

ADVERBS = ["very", "quite", "really", "so", "truly", "rather", "pretty"]


@dataclass(frozen=True)
class Review:
    prompt: str
    completion: str
    label: str  # "pos" or "neg": the body's main sentiment

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.completion}"


def _fill(template: str, rng: random.Random, domain: str, aspects: list, words: dict, other: dict) -> str:
    """Fill each placeholder with a fresh random choice (two {adj} may differ, as in real text)."""
    picks = {
        "domain": lambda: domain,
        "aspect": lambda: rng.choice(aspects),
        "adj": lambda: rng.choice(words["adj"]),
        "other_adj": lambda: rng.choice(other["adj"]),
        "verb": lambda: rng.choice(words["verb"]),
        "close": lambda: rng.choice(words["close"]),
        "adv": lambda: rng.choice(ADVERBS),
    }
    out = template
    while "{" in out:
        start = out.index("{")
        end = out.index("}", start)
        out = out[:start] + picks[out[start + 1:end]]() + out[end + 1:]
    return out


def make_review(rng: random.Random, label: str) -> Review:
    domain = rng.choice(sorted(DOMAINS))
    aspects = DOMAINS[domain]
    other = WORDS["neg" if label == "pos" else "pos"]
    prompt = _fill(rng.choice(OPENERS), rng, domain, aspects, WORDS[label], other)
    completion = _fill(rng.choice(BODIES), rng, domain, aspects, WORDS[label], other)
    return Review(prompt, completion, label)


def _with_mood(rng: random.Random, review: Review) -> Review:
    if rng.random() >= MOOD_RATE:
        return review
    matching = rng.random() < MOOD_MATCH
    mood = rng.choice(MOODS[review.label if matching else ("neg" if review.label == "pos" else "pos")])
    return Review(f"{mood} {review.prompt}", review.completion, review.label)


def make_corpus(n: int, seed: int) -> list:
    """`n` reviews, exactly balanced between positive and negative, in a seeded random order."""
    if n < 2:
        raise ValueError(f"make_corpus: n must be at least 2, got {n}")
    rng = random.Random(seed)
    labels = ["pos", "neg"] * (n // 2) + (["pos"] if n % 2 else [])
    rng.shuffle(labels)
    return [_with_mood(rng, make_review(rng, label)) for label in labels]


def make_prompts(n: int, seed: int) -> list:
    """`n` distinct sentiment-neutral openers (the prompts the model completes), seeded."""
    rng = random.Random(seed)
    seen, prompts, misses = set(), [], 0
    while len(prompts) < n:
        prompt = make_review(rng, "pos").prompt
        if prompt in seen:
            misses += 1
            if misses > 10_000:  # the templates are exhausted
                raise ValueError(f"make_prompts: the templates give only about {len(prompts)} distinct prompts, "
                                 f"{n} were asked for")
            continue
        misses = 0
        seen.add(prompt)
        prompts.append(prompt)
    return prompts
