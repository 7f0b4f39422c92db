"""Write the bundled verifiable instruction-following data: `instruct.jsonl`, `instruct-eval.jsonl` and
`instruct-pairs.jsonl`.

Run once from the repository root (the output is committed; the script is deterministic):

    python scripts/make_instruct_data.py

Each row: `{"prompt", "response", "constraints": [{"kind": ..., params}], "answer"}`. Prompts
are a simple question (a capital, a colour, an animal fact, small arithmetic, a word task)
followed by one or two checkable constraints, in the spirit of IFEval. Every chosen response
satisfies its constraints and contains its answer (asserted with `sapo_lite.data.constraints`).

The held-out split measures generalisation, not recall: its prompts never occur in training,
it draws content from items kept out of training (countries, words, objects, animals, operand
pairs), and every constraint is phrased in wording never used in training. Responses stay
short (a 135M chat model trains on them with ~160 tokens including the chat template).
`instruct-pairs.jsonl` is preference data for the same 2,000 training prompts (Tulu 3's recipe for
instruction-following pairs): `chosen` is the response above, `rejected` an answer that breaks
exactly one of the prompt's constraints (a seeded choice, named in `broken`) and meets the others,
asserted with the same checkers. Its held-out set is `instruct-eval.jsonl`, as for `instruct`.
Standard library only, plus the package's own checkers.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sapo_lite.data.constraints import answer_correct, check  # noqa: E402

SEED = 20240530
TRAIN_ROWS = 2000
EVAL_ROWS = 200

# ---------------------------------------------------------------- content
# (country, capital, continent). The last 20 are held out.
COUNTRIES = [
    ("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"), ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"), ("Portugal", "Lisbon", "Europe"), ("Greece", "Athens", "Europe"),
    ("Austria", "Vienna", "Europe"), ("Poland", "Warsaw", "Europe"), ("Ireland", "Dublin", "Europe"),
    ("Norway", "Oslo", "Europe"), ("Sweden", "Stockholm", "Europe"), ("Finland", "Helsinki", "Europe"),
    ("Denmark", "Copenhagen", "Europe"), ("Hungary", "Budapest", "Europe"), ("Belgium", "Brussels", "Europe"),
    ("Japan", "Tokyo", "Asia"), ("China", "Beijing", "Asia"), ("India", "New Delhi", "Asia"),
    ("Thailand", "Bangkok", "Asia"), ("Vietnam", "Hanoi", "Asia"), ("South Korea", "Seoul", "Asia"),
    ("Indonesia", "Jakarta", "Asia"), ("Iran", "Tehran", "Asia"), ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"), ("Nigeria", "Abuja", "Africa"), ("Ghana", "Accra", "Africa"),
    ("Morocco", "Rabat", "Africa"), ("Ethiopia", "Addis Ababa", "Africa"), ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"), ("Cuba", "Havana", "North America"),
    ("Brazil", "Brasilia", "South America"), ("Argentina", "Buenos Aires", "South America"),
    ("Peru", "Lima", "South America"), ("Chile", "Santiago", "South America"),
    ("Australia", "Canberra", "Oceania"), ("New Zealand", "Wellington", "Oceania"),
    ("Russia", "Moscow", "Europe"), ("Turkey", "Ankara", "Asia"),
    # held out
    ("Netherlands", "Amsterdam", "Europe"), ("Switzerland", "Bern", "Europe"), ("Czechia", "Prague", "Europe"),
    ("Romania", "Bucharest", "Europe"), ("Iceland", "Reykjavik", "Europe"), ("Philippines", "Manila", "Asia"),
    ("Malaysia", "Kuala Lumpur", "Asia"), ("Pakistan", "Islamabad", "Asia"), ("Nepal", "Kathmandu", "Asia"),
    ("Iraq", "Baghdad", "Asia"), ("Senegal", "Dakar", "Africa"), ("Tanzania", "Dodoma", "Africa"),
    ("Uganda", "Kampala", "Africa"), ("Colombia", "Bogota", "South America"),
    ("Venezuela", "Caracas", "South America"), ("Ecuador", "Quito", "South America"),
    ("Jamaica", "Kingston", "North America"), ("Panama", "Panama City", "North America"),
    ("Fiji", "Suva", "Oceania"), ("Ukraine", "Kyiv", "Europe"),
]
# (thing, colour). The last 8 are held out.
COLOURED = [
    ("the sky on a clear day", "blue"), ("grass", "green"), ("a ripe banana", "yellow"), ("snow", "white"),
    ("coal", "black"), ("a ripe tomato", "red"), ("a carrot", "orange"), ("milk", "white"),
    ("a lemon", "yellow"), ("a lime", "green"), ("blood", "red"), ("the sea", "blue"),
    ("a pumpkin", "orange"), ("a crow", "black"), ("a fire truck", "red"), ("an eggplant", "purple"),
    ("chocolate", "brown"), ("a polar bear", "white"), ("a frog", "green"), ("a flamingo", "pink"),
    # held out
    ("a strawberry", "red"), ("a cucumber", "green"), ("a sunflower", "yellow"), ("a raven", "black"),
    ("a swan", "white"), ("an orange", "orange"), ("a grape", "purple"), ("coffee", "brown"),
]
# (animal, sound, legs, baby). The last 6 are held out.
ANIMALS = [
    ("cow", "moo", 4, "calf"), ("dog", "bark", 4, "puppy"), ("cat", "meow", 4, "kitten"),
    ("sheep", "baa", 4, "lamb"), ("duck", "quack", 2, "duckling"), ("horse", "neigh", 4, "foal"),
    ("pig", "oink", 4, "piglet"), ("lion", "roar", 4, "cub"), ("owl", "hoot", 2, "owlet"),
    ("hen", "cluck", 2, "chick"), ("snake", "hiss", 0, "snakelet"), ("frog", "croak", 4, "tadpole"),
    ("bee", "buzz", 6, "larva"), ("goat", "bleat", 4, "kid"),
    # held out
    ("donkey", "bray", 4, "foal"), ("wolf", "howl", 4, "pup"), ("mouse", "squeak", 4, "pup"),
    ("rooster", "crow", 2, "chick"), ("bear", "growl", 4, "cub"), ("goose", "honk", 2, "gosling"),
]
WORDS = [
    "apple", "river", "garden", "window", "planet", "silver", "candle", "forest", "rabbit", "pencil",
    "orange", "castle", "dragon", "summer", "winter", "butter", "rocket", "guitar", "basket", "jungle",
    "market", "pocket", "ticket", "hammer", "ladder", "mirror", "button", "carpet", "doctor", "engine",
    "flower", "island", "kitten", "lemon", "monkey", "needle", "parrot", "rainbow", "shadow", "tomato",
    "violin", "wizard", "yellow", "zebra", "anchor", "bottle", "cactus", "dinner", "falcon", "goblet",
    "harbor", "insect", "jacket", "kettle", "lizard", "meadow", "napkin", "oyster", "puzzle", "quartz",
    # held out
    "banana", "cookie", "pepper", "spider", "turtle", "valley", "walnut", "camera", "helmet", "marble",
    "pillow", "saddle", "temple", "velvet", "wallet", "bridge", "cotton", "ginger", "magnet", "parcel",
]
HELD_OUT = {"countries": 20, "coloured": 8, "animals": 6, "words": 20}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


class Item:
    """One question: its text, a yes/no variant, the answer, and comma-free one-sentence facts."""

    def __init__(self, question: str, answer: str, facts: list[str], yes_no: tuple[str, str]) -> None:
        assert len(facts) >= 4 and all("," not in f for f in facts), facts
        self.question, self.answer, self.facts, self.yes_no = question, answer, facts, yes_no


def capital_items(rows, rng) -> list[Item]:
    items = []
    for country, capital, continent in rows:
        other = rng.choice([r[1] for r in COUNTRIES if r[1] != capital])
        claimed, truth = (capital, "Yes") if rng.random() < 0.5 else (other, "No")
        items.append(Item(
            rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"]),
            capital,
            [f"The capital of {country} is {capital}.", f"{capital} is a city in {country}.",
             f"{country} is in {continent}.", f"The government of {country} sits in {capital}."],
            (f"Is {claimed} the capital of {country}?", truth),
        ))
    return items


def colour_items(rows, rng) -> list[Item]:
    items = []
    for thing, colour in rows:
        subject = thing[0].upper() + thing[1:]
        other = rng.choice(sorted({c for _, c in COLOURED} - {colour}))
        claimed, truth = (colour, "Yes") if rng.random() < 0.5 else (other, "No")
        items.append(Item(
            rng.choice([f"What colour is {thing}?", f"What is the usual colour of {thing}?"]),
            colour,
            [f"{subject} is {colour}.", f"The usual colour of {thing} is {colour}.",
             f"Most people would call it {colour}.", f"{colour.capitalize()} is the answer."],
            (f"Is {thing} usually {claimed}?", truth),
        ))
    return items


def animal_items(rows, rng) -> list[Item]:
    items = []
    for animal, sound, legs, baby in rows:
        a = "an" if animal[0] in "aeiou" else "a"
        kind = rng.randrange(3)
        if kind == 0:
            other = rng.choice(sorted({r[1] for r in ANIMALS} - {sound}))
            claimed, truth = (sound, "Yes") if rng.random() < 0.5 else (other, "No")
            items.append(Item(
                f"What sound does {a} {animal} make?", sound,
                [f"{a.capitalize()} {animal} says {sound}.", f"The sound of {a} {animal} is a {sound}.",
                 f"People write it as {sound}.", f"You may hear {a} {animal} {sound} on a farm or in the wild."],
                (f"Does {a} {animal} say {claimed}?", truth),
            ))
        elif kind == 1:
            claimed = legs if rng.random() < 0.5 else rng.choice([n for n in (0, 2, 4, 6, 8) if n != legs])
            items.append(Item(
                f"How many legs does {a} {animal} have?", str(legs),
                [f"{a.capitalize()} {animal} has {legs} legs.", f"The answer is {legs}.",
                 f"Count them and you get {legs}.", f"{NUMBER_WORDS[legs].capitalize()} is the number of legs."],
                (f"Does {a} {animal} have {claimed} legs?", "Yes" if claimed == legs else "No"),
            ))
        else:
            other = rng.choice(sorted({r[3] for r in ANIMALS} - {baby}))
            claimed, truth = (baby, "Yes") if rng.random() < 0.5 else (other, "No")
            items.append(Item(
                f"What is a baby {animal} called?", baby,
                [f"A baby {animal} is called a {baby}.", f"The young of {a} {animal} is a {baby}.",
                 f"People call it a {baby}.", f"{baby.capitalize()} is the word for it."],
                (f"Is a baby {animal} called a {claimed}?", truth),
            ))
    return items


def arithmetic_items(held_out: bool, count: int, rng) -> list[Item]:
    """Operand pairs are split between the splits by a fixed rule, so no sum is asked in both."""
    items = []
    while len(items) < count:
        op = rng.choice(["plus", "minus", "times"])
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "times" else (rng.randint(2, 60), rng.randint(2, 40))
        if op == "minus" and b > a:
            a, b = b, a
        if ((a * 31 + b * 17) % 10 == 0) != held_out:
            continue
        result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        claimed = result if rng.random() < 0.5 else result + rng.choice([-2, -1, 1, 2, 10])
        items.append(Item(
            rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}."]),
            str(result),
            [f"{a} {op} {b} is {result}.", f"The answer is {result}.", f"So the result is {result}.",
             "You can check it by working it out again."],
            (f"Is {a} {op} {b} equal to {claimed}?", "Yes" if claimed == result else "No"),
        ))
    return items


def word_items(rows, rng) -> list[Item]:
    items = []
    for word in rows:
        kind = rng.randrange(3)
        if kind == 0:
            backwards = word[::-1]
            claimed = backwards if rng.random() < 0.5 else word[1:][::-1] + word[0]
            items.append(Item(
                rng.choice([f"Spell the word {word} backwards.", f"What is {word} written backwards?"]),
                backwards,
                [f"{word.capitalize()} backwards is {backwards}.", f"Reversed it reads {backwards}.",
                 f"The word has {len(word)} letters.", f"It starts with {word[0]} and ends with {word[-1]}."],
                (f"Is {word} written backwards {claimed}?", "Yes" if claimed == backwards else "No"),
            ))
        elif kind == 1:
            n = len(word)
            claimed = n if rng.random() < 0.5 else n + rng.choice([-1, 1, 2])
            items.append(Item(
                rng.choice([f"How many letters are in the word {word}?", f"Count the letters in {word}."]),
                str(n),
                [f"The word {word} has {n} letters.", f"The answer is {n}.",
                 f"Its letters are {' '.join(word)}.", f"It starts with {word[0]} and ends with {word[-1]}."],
                (f"Does the word {word} have {claimed} letters?", "Yes" if claimed == n else "No"),
            ))
        else:
            letter = rng.choice(sorted(set(word)))
            n = word.count(letter)
            claimed = n if rng.random() < 0.5 else n + 1
            times = "time" if n == 1 else "times"
            items.append(Item(
                f"How many times does the letter {letter} appear in {word}?",
                str(n),
                [f"The letter {letter} appears {n} {times} in {word}.", f"The answer is {n}.",
                 f"The word is spelled {' '.join(word)}.", f"It has {len(word)} letters in all."],
                (f"Does the letter {letter} appear {claimed} times in {word}?", "Yes" if claimed == n else "No"),
            ))
    return items


def content(held_out: bool, rng) -> list[Item]:
    def part(rows, key):
        cut = len(rows) - HELD_OUT[key]
        return rows[cut:] if held_out else rows[:cut]

    items = capital_items(part(COUNTRIES, "countries"), rng)
    items += colour_items(part(COLOURED, "coloured"), rng)
    items += animal_items(part(ANIMALS, "animals"), rng)
    items += word_items(part(WORDS, "words"), rng)
    items += arithmetic_items(held_out, 60 if held_out else 150, rng)
    return items


# ---------------------------------------------------------------- constraints
# Each kind: how its parameters are drawn, and its phrasings. Training and held-out wording
# never share a template.
PHRASES = {
    "all_lowercase": (
        ["Answer in all lowercase letters.", "Write your whole answer in lowercase.", "Use only lowercase letters."],
        ["Do not use any capital letters in your reply.", "Your reply must contain no uppercase characters."],
    ),
    "all_uppercase": (
        ["Answer in all capital letters.", "Write your whole answer in uppercase.", "Use only capital letters."],
        ["Reply entirely in block capitals.", "Every letter of your reply must be upper case."],
    ),
    "no_commas": (
        ["Do not use any commas.", "Avoid commas in your answer.", "Answer without using commas."],
        ["Your response must not contain the character ','.", "Leave out every comma."],
    ),
    "max_words": (
        ["Answer in at most {n} words.", "Use no more than {n} words.", "Keep your answer to {n} words or fewer."],
        ["Your whole reply must be {nw} words long at most.", "Do not exceed a length of {n} words."],
    ),
    "end_with": (
        ['End your answer with the word "{word}".', 'Finish your response with the word "{word}".',
         'Your answer must end with "{word}".'],
        ['The last word of your reply must be "{word}".', 'Close your reply with the single word "{word}".'],
    ),
    "start_yes_no": (
        ["Start your answer with Yes or No.", "Begin with Yes or No.", "Your first word must be Yes or No."],
        ["Open your reply with the word Yes or the word No.", "Reply Yes or No first and then explain."],
    ),
    "include_word": (
        ['Use the word "{word}" in your answer.', 'Include the word "{word}".',
         'Your answer must contain the word "{word}".'],
        ['Make sure your reply mentions "{word}" somewhere.', 'Work the word "{word}" into your reply.'],
    ),
    "bullet_count": (
        ["Answer with exactly {n} bullet points.", "Give exactly {n} bullet points.",
         "Use exactly {n} bullet points starting with -."],
        ["Format your reply as a list of {nw} items, each on its own line starting with a dash.",
         "Respond using precisely {n} markdown bullets."],
    ),
    "sentence_count": (
        ["Answer in exactly {n} sentence{s}.", "Use exactly {n} sentence{s}.", "Write exactly {n} sentence{s}."],
        ["Your reply should be {nw} sentence{s} long.", "Respond in precisely {n} full sentence{s}."],
    ),
    "json_key": (
        ['Reply only with a JSON object with the key "{key}".', 'Answer with a JSON object that has a "{key}" key.',
         'Give your answer as JSON with the key "{key}".'],
        ['Output nothing but a JSON dictionary whose single field is named "{key}".',
         'Return a JSON map containing the field "{key}" and no other text.'],
    ),
}
# Parameter values differ between the splits where they can, for the same reason.
END_WORDS = (["goodbye", "done", "finished", "thanks", "over"], ["cheers", "amen", "bye"])
INCLUDE_WORDS = (["indeed", "certainly", "clearly", "surely"], ["truly", "honestly", "plainly"])
JSON_KEYS = (["answer", "result", "reply"], ["output", "value", "response"])
SHAPES = ["max_words", "end_with", "start_yes_no", "include_word", "bullet_count", "sentence_count", "json_key"]
STYLES = ["all_lowercase", "all_uppercase", "no_commas"]
# A style rule on top of a shape, where the two can hold at once (a JSON key would change case).
STYLE_OK = {shape: STYLES for shape in SHAPES} | {"json_key": ["no_commas"]}


def draw_constraint(kind: str, held_out: bool, rng) -> dict:
    side = 1 if held_out else 0
    if kind == "max_words":
        return {"kind": kind, "n": rng.choice([4, 5, 6, 8, 10, 12])}
    if kind == "end_with":
        return {"kind": kind, "word": rng.choice(END_WORDS[side])}
    if kind == "include_word":
        return {"kind": kind, "word": rng.choice(INCLUDE_WORDS[side])}
    if kind == "bullet_count":
        return {"kind": kind, "n": rng.choice([2, 3, 4])}
    if kind == "sentence_count":
        return {"kind": kind, "n": rng.choice([1, 2, 3])}
    if kind == "json_key":
        return {"kind": kind, "key": rng.choice(JSON_KEYS[side])}
    return {"kind": kind}


def phrase(constraint: dict, held_out: bool, rng) -> str:
    template = rng.choice(PHRASES[constraint["kind"]][1 if held_out else 0])
    n = constraint.get("n")
    return template.format(n=n, nw=NUMBER_WORDS[n] if n is not None and n <= 10 else n,
                           word=constraint.get("word"), key=constraint.get("key"), s="" if n == 1 else "s")


def respond(item: Item, shape: str | None, style: str | None, constraints: list[dict]) -> str:
    """The chosen response: built for the shape, then the style applied on top."""
    params = constraints[0]
    base = item.facts[0]
    if shape is None:
        text = base
    elif shape == "max_words":
        text = base if len(base.split()) <= params["n"] else f"It is {item.answer}."
    elif shape == "end_with":
        text = f"{base} {params['word'].capitalize()}."
    elif shape == "start_yes_no":
        text = f"{item.yes_no[1]}. {base}"
    elif shape == "include_word":
        # No fact opens with a proper noun, so its first letter can go lowercase.
        text = f"{params['word'].capitalize()} {base[0].lower() + base[1:]}"
    elif shape == "bullet_count":
        text = "\n".join(f"- {fact}" for fact in item.facts[: params["n"]])
    elif shape == "sentence_count":
        text = " ".join(item.facts[: params["n"]])
    elif shape == "json_key":
        text = json.dumps({params["key"]: item.answer})
    else:
        raise ValueError(shape)
    if style == "all_lowercase":
        text = text.lower()
    elif style == "all_uppercase":
        text = text.upper()
    return text


def make_rows(held_out: bool, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    items = content(held_out, rng)
    # Each row takes the least used kind so far and, 45% of the time, the least used kind
    # of the other group (shapes vs styles) that can hold with it: counts stay balanced.
    used: Counter = Counter()
    rows, seen = [], set()
    attempts = 0
    while len(rows) < count:
        attempts += 1
        assert attempts < count * 50, "ran out of distinct prompts"
        first = least_used(SHAPES + STYLES, used, rng)
        shape, style = (first, None) if first in SHAPES else (None, first)
        if rng.random() < 0.45:
            if shape:
                style = least_used(STYLE_OK[shape], used, rng)
            else:
                shape = least_used([s for s in SHAPES if style in STYLE_OK[s]], used, rng)
        item = rng.choice(items)
        constraints = ([draw_constraint(shape, held_out, rng)] if shape else []) + (
            [draw_constraint(style, held_out, rng)] if style else [])
        question = item.yes_no[0] if shape == "start_yes_no" else item.question
        prompt = " ".join([question, *(phrase(c, held_out, rng) for c in constraints)])
        if prompt in seen:
            continue
        response = respond(item, shape, style, constraints)
        for constraint in constraints:
            assert check(response, constraint), (prompt, response, constraint)
        assert answer_correct(response, item.answer), (prompt, response, item.answer)
        seen.add(prompt)
        used.update(c["kind"] for c in constraints)
        rows.append({"prompt": prompt, "response": response, "constraints": constraints, "answer": item.answer})
    return rows


def least_used(kinds: list[str], used: Counter, rng) -> str:
    fewest = min(used[k] for k in kinds)
    return rng.choice([k for k in kinds if used[k] == fewest])


def kind_counts(rows: list[dict]) -> Counter:
    return Counter(c["kind"] for row in rows for c in row["constraints"])


# ---------------------------------------------------------------- preference pairs
# Tulu 3's recipe for verifiable instruction-following preference data: the rejected answer breaks
# exactly one of the prompt's constraints and keeps every other. Each kind lists ways to break it,
# tried in order until one breaks that constraint alone (the package's checkers decide).


def styled(text: str, response: str) -> str:
    """`text` in the letter case of `response` (so a break of one rule keeps a case rule intact)."""
    letters = [c for c in response if c.isalpha()]
    if letters and all(c.isupper() for c in letters):
        return text.upper()
    if letters and all(c.islower() for c in letters):
        return text.lower()
    return text


def first_upper(text: str) -> str:
    index = next(i for i, c in enumerate(text) if c.isalpha())
    return text[:index] + text[index].upper() + text[index + 1 :]


def _without_word(text: str, word: str) -> str:
    out = re.sub(rf"(?i)\b{re.escape(word)}\b\s*", "", text, count=1).strip()
    return out if text[0].islower() else first_upper(out)


BREAKS = {
    "all_lowercase": [lambda text, c: first_upper(text)],
    "all_uppercase": [lambda text, c: text.lower().capitalize(), lambda text, c: "- " + text[2:].lower()],
    "no_commas": [lambda text, c: text.replace('": "', '": ",', 1) if text.startswith("{") else None,
                  lambda text, c: ", ".join(text.rsplit(" ", 1))],
    "max_words": [lambda text, c: text.replace(" ", " " + " ".join([styled("really", text)] * c["n"]) + " ", 1)],
    "end_with": [lambda text, c: re.sub(r"\s*\S+\s*$", "", text)],
    "start_yes_no": [lambda text, c: first_upper(re.sub(r"^(?i:yes|no)\.\s*", "", text))
                     if text[0].isupper() else re.sub(r"^(?i:yes|no)\.\s*", "", text)],
    "include_word": [lambda text, c: _without_word(text, c["word"])],
    "bullet_count": [lambda text, c: "\n".join(text.splitlines()[:-1])],
    "sentence_count": [lambda text, c: f"{text} {styled('That is all.', text)}"],
    "json_key": [lambda text, c: str(json.loads(text)[c["key"]])],
}


def rejected_answer(row: dict, broken: dict) -> str:
    """A rejected answer to `row` that fails `broken` and meets every other constraint of the row."""
    others = [c for c in row["constraints"] if c is not broken]
    for make in BREAKS[broken["kind"]]:
        text = make(row["response"], broken)
        if text and not check(text, broken) and all(check(text, c) for c in others):
            return text
    raise AssertionError(f"no way to break only {broken} in {row}")


def make_pairs(rows: list[dict], seed: int) -> list[dict]:
    """The same prompts and chosen answers, each with a rejected answer that breaks one of its constraints
    (a seeded choice among them); `broken` names it."""
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        broken = rng.choice(row["constraints"])
        rejected = rejected_answer(row, broken)
        assert all(check(row["response"], c) for c in row["constraints"])  # chosen passes every one
        assert sum(not check(rejected, c) for c in row["constraints"]) == 1  # rejected fails exactly one
        pairs.append({"prompt": row["prompt"], "chosen": row["response"], "rejected": rejected,
                      "constraints": row["constraints"], "answer": row["answer"], "broken": broken["kind"]})
    return pairs


def main() -> None:
    train = make_rows(held_out=False, count=TRAIN_ROWS, seed=SEED)
    held = make_rows(held_out=True, count=EVAL_ROWS, seed=SEED + 1)
    overlap = {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert not overlap, f"{len(overlap)} prompts in both splits"
    assets = ROOT / "sapo_lite" / "assets"
    pairs = make_pairs(train, SEED + 2)
    for name, rows in (("instruct", train), ("instruct-eval", held), ("instruct-pairs", pairs)):
        with (assets / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    train_counts, held_counts = kind_counts(train), kind_counts(held)
    print(f"{'kind':<16}{'train':>7}{'held-out':>10}")
    for kind in sorted(train_counts):
        print(f"{kind:<16}{train_counts[kind]:>7}{held_counts[kind]:>10}")
    two = sum(len(r["constraints"]) == 2 for r in train), sum(len(r["constraints"]) == 2 for r in held)
    print(f"{'rows':<16}{len(train):>7}{len(held):>10}")
    print(f"{'two constraints':<16}{two[0]:>7}{two[1]:>10}")
    print(f"{'constraints':<16}{sum(train_counts.values()):>7}{sum(held_counts.values()):>10}")
    broken = Counter(row["broken"] for row in pairs)
    print("instruct-pairs, the constraint each rejected answer breaks: "
          + ", ".join(f"{kind} {count}" for kind, count in sorted(broken.items())))


if __name__ == "__main__":
    main()
