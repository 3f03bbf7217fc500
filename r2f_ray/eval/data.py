"""Evaluation data from packaged assets: fact pools, general multiple-choice questions, general prompts
(MIA), held-out text (perplexity) and fictitious facts (membership inference)."""

from __future__ import annotations

import itertools
import random

from r2f_ray import assets
from r2f_ray.assets import Fact
from r2f_ray.core.paraphrase import contains_answer
from r2f_ray.eval.metrics import answered

# General-knowledge multiple choice on subjects unrelated to geography (GUR's non-target task).
GENERAL_MC: list[tuple[str, list[str], int]] = [
    ("How many legs does a spider have?", ["Six", "Eight", "Ten", "Four"], 1),
    ("What is the chemical symbol for water?", ["CO2", "O2", "H2O", "NaCl"], 2),
    ("Which planet is known as the Red Planet?", ["Venus", "Jupiter", "Mars", "Saturn"], 2),
    ("What is the freezing point of water in degrees Celsius?", ["0", "10", "32", "100"], 0),
    ("How many sides does a triangle have?", ["Two", "Three", "Four", "Five"], 1),
    ("Which organ pumps blood through the human body?", ["The liver", "The lungs", "The heart", "The kidneys"], 2),
    ("What do bees make?", ["Milk", "Honey", "Silk", "Wax paper"], 1),
    ("Which animal is the largest mammal?", ["The elephant", "The blue whale", "The giraffe", "The horse"], 1),
    ("What is the opposite of hot?", ["Warm", "Cold", "Wet", "Bright"], 1),
    ("How many hours are there in a day?", ["12", "24", "48", "60"], 1),
    ("Which instrument has black and white keys?", ["The violin", "The drum", "The piano", "The flute"], 2),
    ("What is the main language spoken in Brazil?", ["Spanish", "Portuguese", "French", "English"], 1),
    ("What do plants need from the sun to make food?", ["Light", "Sound", "Wind", "Snow"], 0),
    ("Which shape has four equal sides and four right angles?", ["A circle", "A triangle", "A square", "A pentagon"], 2),
    ("What is ten minus three?", ["Five", "Six", "Seven", "Eight"], 2),
    ("Who painted the Mona Lisa?", ["Vincent van Gogh", "Leonardo da Vinci", "Pablo Picasso", "Claude Monet"], 1),
]

_GENERAL_PROMPTS = [
    "Give me a tip for sleeping better.", "Write one sentence about the ocean.", "What is a good breakfast?",
    "Explain what a computer does.", "How do I boil an egg?", "Name a popular sport.", "What is your favourite colour?",
    "Describe a cat in a few words.", "Why do people exercise?", "Tell me a short joke.", "What is rain?",
    "How can I learn a new language?", "What is music?", "Suggest a name for a dog.", "What does a teacher do?",
    "How do trees grow?",
]


def general_prompts(n: int) -> list[str]:
    """``n`` general-purpose prompts (MIA): handwritten ones, then openings of Lee news articles."""
    prompts = list(_GENERAL_PROMPTS)
    for text in assets.lee_texts():
        if len(prompts) >= n:
            break
        prompts.append("Continue this text: " + " ".join(text.split()[:14]))
    return prompts[:n]


def heldout_texts(n: int) -> list[str]:
    """``n`` Wikipedia paragraphs (the decoder's proxy data is news text; this is held out from it)."""
    return list(itertools.islice(assets.wiki_texts(), n))


def fact_pool(relations: tuple[str, ...] = ("capital",)) -> list[Fact]:
    """Facts from countryinfo for the relations, plus gensim's questions-words capitals; one per
    (subject, relation), without those whose question contains the answer."""
    facts = list(assets.country_facts(relations))
    if "capital" in relations:
        facts += assets.questions_words_capitals()
    seen, unique = set(), []
    for f in facts:
        key = (f.subject.lower(), f.relation)
        # "What is the capital of Mexico?" -> "Mexico City": the question already says the answer
        if key not in seen and not contains_answer(f.prompt, f.answer):
            seen.add(key)
            unique.append(f)
    return unique


def known_facts(model, tokenizer, facts: list[Fact], want: int, seed: int = 0, batch: int = 32,
                max_new_tokens: int = 16, progress=None) -> list[Fact]:
    """The first ``want`` facts (in a seeded shuffle) whose answer the model produces greedily:
    forget sets are measured, not assumed."""
    order = list(facts)
    random.Random(seed).shuffle(order)
    known: list[Fact] = []
    for i in range(0, len(order), batch):
        chunk = order[i:i + batch]
        hits = answered(model, tokenizer, [(f.prompt, f.answer) for f in chunk], max_new_tokens)
        known += [f for f, h in zip(chunk, hits) if h]
        if progress:
            progress(len(known), i + len(chunk))
        if len(known) >= want:
            break
    if len(known) < want:
        raise ValueError(f"the model knows only {len(known)} of {len(order)} candidate facts; ask for at most {len(known)}")
    return known[:want]


_SYLLABLES = ["ka", "lo", "ven", "dra", "mir", "tho", "sel", "qua", "bri", "nor", "zan", "pel", "rus", "tiv", "gor", "ema"]


def fictitious_facts(n: int, seed: int = 0) -> list[Fact]:
    """Invented countries and capitals (TOFU-style facts no model can know), deterministic in seed."""
    rng = random.Random(seed)

    def word(parts: int) -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()

    facts, used = [], set()
    while len(facts) < n:
        country, capital = word(3), word(2)
        if country in used or capital in used:
            continue
        used |= {country, capital}
        facts.append(Fact(country, "capital", capital, f"What is the capital of {country}?"))
    return facts
