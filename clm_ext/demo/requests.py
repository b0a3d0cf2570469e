"""Sentiment-neutral requests for a chat model: "write a short review or description of X".

The real-model demo is a chat version of the DPO paper's controlled-sentiment task. Each request names a
subject (a product, place, film, trip, meal ...) and a neutral wording; neither says whether to praise or
criticise, so the base model writes both kinds and the preference signal decides the direction. The subjects
of the training requests and of the evaluation requests are disjoint, so the sweep is judged on requests the
training never saw.
"""
import random

# Two disjoint subject lists per kind: (training, evaluation).
SUBJECTS = {
    "product": (["a pair of running shoes", "a budget smartphone", "a coffee maker", "a backpack", "a desk lamp",
                 "a wireless keyboard", "a rice cooker", "a winter jacket", "an electric toothbrush",
                 "a camping tent", "a blender", "a pair of headphones"],
                ["a kitchen knife", "a smartwatch", "a yoga mat", "an office chair", "a travel mug",
                 "a vacuum cleaner"]),
    "place": (["a small seaside town", "a city park", "a local museum", "a train station", "a public library",
               "a mountain village", "a shopping mall", "a zoo", "a botanical garden", "a football stadium"],
              ["an old castle", "a night market", "a ski resort", "a lakeside campsite", "an art gallery"]),
    "film": (["a science fiction film", "a romantic comedy", "a documentary about oceans", "a horror movie",
              "an animated family film", "a war drama", "a detective series", "a musical"],
             ["a superhero movie", "a historical drama", "a nature documentary", "a crime thriller"]),
    "trip": (["a weekend trip to the mountains", "a long train journey", "a road trip along the coast",
              "a business trip abroad", "a camping trip", "a cruise", "a city break", "a cycling holiday"],
             ["a beach holiday", "a hiking trip", "a family visit to the countryside", "a ferry crossing"]),
    "meal": (["a pizza from a new restaurant", "a hotel breakfast", "a street food stall", "a sushi bar",
              "a vegetarian cafe", "a steakhouse", "a bakery", "a school cafeteria"],
             ["a Thai restaurant", "a food truck", "a fancy dinner", "a roadside diner"]),
    "stay": (["a hotel room", "a holiday apartment", "a youth hostel", "a countryside inn", "an airport hotel",
              "a beach resort"],
             ["a bed and breakfast", "a mountain hut", "a city hotel"]),
    "other": (["a video game", "a novel", "a concert", "a gym", "a language course", "a dentist appointment",
               "a board game", "a podcast"],
              ["a theatre play", "a cooking class", "a music album", "a swimming pool"]),
}

WORDINGS = [
    "Write a one-sentence review of {x}.",
    "Write a short review of {x} in one or two sentences.",
    "Describe {x} in one or two sentences.",
    "In two sentences, tell me what you think of {x}.",
    "Give a brief review of {x}.",
    "Write two sentences about your experience with {x}.",
    "Share your opinion of {x} in a sentence or two.",
    "Write a short description of {x}.",
]


def make_requests(n: int, split: str, seed: int) -> list:
    """`n` distinct requests from the `split` ("train" or "eval") subjects, in a seeded order."""
    if split not in ("train", "eval"):
        raise ValueError(f"make_requests: split must be 'train' or 'eval', got {split!r}")
    subjects = [s for pair in SUBJECTS.values() for s in pair[0 if split == "train" else 1]]
    every = [w.format(x=s) for s in subjects for w in WORDINGS]
    if n > len(every):
        raise ValueError(f"make_requests: only {len(every)} distinct {split} requests exist, {n} were asked for")
    random.Random(seed).shuffle(every)
    return every[:n]
