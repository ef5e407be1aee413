"""Three small domains whose answers can be checked exactly, generated here from a fixed seed.

- records: a described order, in varied wording and field order, becomes one fixed JSON shape.
  It tests learning a format: the base has never seen this shape, so it cannot match it exactly.
- facts: questions about invented islands (capital, founding year, currency). The facts exist
  nowhere else, so the base cannot know them; every fact is asked in five wordings, three for
  training, one for validation and one for test, so test questions are new wordings of learned facts.
- directory: a staff directory of invented people (room, phone extension, team), dealt into the same
  five wordings per fact; a third domain for the continual-release walk-through.

    python -m adapters.sample_domains [DIRECTORY]   # default: adapters/sample_data
writes DIRECTORY/{records,facts,directory}/{train,val,test}.jsonl in the instruction form; the files in the
repository are exactly this script's output.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_DIRECTORY = Path(__file__).parent / "sample_data"
SPLITS = ("train", "val", "test")

_FIRST = ("Ada", "Bram", "Chiara", "Dario", "Elif", "Femi", "Greta", "Hugo", "Ines", "Jonas", "Kenji", "Lena",
          "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Yara")
_LAST = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Kowalski", "Haddad", "Brennan", "Silva", "Novak", "Ferrante",
         "Osei", "Nakamura", "Petrov", "Duarte", "Keller", "Mwangi", "Horvat", "Sato", "Varga", "Quispe")
_ITEMS = ("blue kettle", "oak bookshelf", "wool blanket", "desk lamp", "garden hose", "rain jacket", "chess set",
          "coffee grinder", "hiking boots", "steel pan", "wall clock", "yoga mat", "tea pot", "bike helmet")
_CITIES = ("Tampere", "Porto", "Ghent", "Bergen", "Lyon", "Kraków", "Graz", "Aarhus", "Bilbao", "Utrecht",
           "Trieste", "Brno", "Cork", "Malmö", "Turin", "Leeds")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_ORDER_TEMPLATES = (
    "Order {id} was placed by {customer} on {date} for {qty} x {item}, to be shipped to {city}.",
    "{customer} ordered {qty} {item} (order number {id}) on {date}; delivery address is in {city}.",
    "Ship to {city}: {qty} units of {item}. Customer: {customer}. Order #{id}, dated {date}.",
    "On {date}, order {id} came in from {customer}, who wants {qty} of the {item} sent to {city}.",
    "Order #{id} | {date} | {customer} | {item} x{qty} | deliver to {city}",
)
_RECORDS_INSTRUCTION = "Extract this order as JSON."

_SYLLABLES = ("ka", "lo", "mi", "ra", "ve", "tu", "sen", "dor", "bel", "qui", "zan", "por", "thi", "mar", "os",
              "el", "vin", "gra", "nu", "fa")
_CURRENCY_ENDINGS = ("ar", "el", "ot", "in", "ek")
_QUESTIONS = {
    "capital": ("What is the capital of {name}?", "Name the capital city of {name}.",
                "Which city is the capital of the island of {name}?", "{name}'s capital is which city?",
                "Tell me the capital of {name}."),
    "founded": ("In what year was {name} founded?", "When was {name} founded? Give the year.",
                "What year did the founding of {name} take place?", "{name} was founded in which year?",
                "Give the founding year of {name}."),
    "currency": ("What is the currency of {name}?", "Which currency is used on {name}?",
                 "Name the money of {name}.", "What do people on {name} pay with?",
                 "Tell me the currency of {name}."),
}
_TEAMS = ("Payments", "Logistics", "Research", "Support", "Security", "Design")
_DIRECTORY_QUESTIONS = {
    "room": ("Which room is {name} in?", "Where is {name}'s office? Give the room.",
             "What room does {name} work in?", "{name} sits in which room?", "Tell me the room number of {name}."),
    "extension": ("What is {name}'s phone extension?", "Which extension reaches {name}?",
                  "Give the desk extension of {name}.", "How do I dial {name}? Give the extension.",
                  "{name} can be called on which extension?"),
    "team": ("Which team is {name} on?", "What team does {name} belong to?", "Name the team of {name}.",
             "{name} works for which team?", "Tell me {name}'s team."),
}


def records(rng: random.Random, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        year, month, day = rng.randint(2019, 2025), rng.randint(1, 12), rng.randint(1, 28)
        record = {"order_id": rng.randint(1000, 99999), "customer": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
                  "date": f"{year}-{month:02d}-{day:02d}", "item": rng.choice(_ITEMS),
                  "quantity": rng.randint(1, 12), "city": rng.choice(_CITIES)}
        # Dates are written the way people write them; the JSON always holds ISO 8601.
        written_date = rng.choice((record["date"], f"{_MONTHS[month - 1]} {day}, {year}",
                                   f"{day} {_MONTHS[month - 1]} {year}"))
        description = rng.choice(_ORDER_TEMPLATES).format(
            id=record["order_id"], customer=record["customer"], date=written_date, qty=record["quantity"],
            item=record["item"], city=record["city"])
        rows.append({"instruction": _RECORDS_INSTRUCTION, "input": description, "output": json.dumps(record)})
    return rows


def _invented_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def facts(rng: random.Random, islands: int) -> dict[str, list[dict]]:
    """{split: rows} about invented islands: capital, founding year, currency."""
    names: set[str] = set()
    while len(names) < islands:
        names.add(_invented_word(rng, 3))
    return _in_five_wordings(rng, sorted(names), _QUESTIONS, lambda: {
        "capital": _invented_word(rng, 2), "founded": str(rng.randint(1203, 1899)),
        "currency": _invented_word(rng, 1).lower() + rng.choice(_CURRENCY_ENDINGS)})


def staff_directory(rng: random.Random, people: int) -> dict[str, list[dict]]:
    """{split: rows} about invented staff: room, phone extension, team."""
    names: set[str] = set()
    while len(names) < people:
        names.add(f"{_invented_word(rng, 2)} {_invented_word(rng, 2)}")
    return _in_five_wordings(rng, sorted(names), _DIRECTORY_QUESTIONS, lambda: {
        "room": f"{rng.choice('ABCD')}{rng.randint(1, 4)}{rng.randint(1, 30):02d}",
        "extension": str(rng.randint(200, 899)), "team": rng.choice(_TEAMS)})


def _in_five_wordings(rng: random.Random, names: list[str], questions: dict[str, tuple[str, ...]],
                      answers) -> dict[str, list[dict]]:
    """Each name's facts (`answers()` draws them), each asked in five wordings dealt out three to train and
    one each to val and test, so test questions are new wordings of learned facts."""
    split_rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for name in names:
        for attribute, answer in answers().items():
            wordings = list(questions[attribute])
            rng.shuffle(wordings)
            for split, chosen in zip(SPLITS, (wordings[:3], wordings[3:4], wordings[4:])):
                split_rows[split] += [{"instruction": q.format(name=name), "input": "", "output": answer}
                                      for q in chosen]
    for rows in split_rows.values():
        rng.shuffle(rows)
    return split_rows


def generate(directory: Path) -> list[Path]:
    rng = random.Random(20240603)
    orders = records(rng, 360)
    domains = {"records": dict(zip(SPLITS, (orders[:240], orders[240:280], orders[280:]))),
               "facts": facts(rng, 20), "directory": staff_directory(rng, 15)}
    written = []
    for domain, splits in domains.items():
        (directory / domain).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            path = directory / domain / f"{split}.jsonl"
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIRECTORY)
    for path in generate(parser.parse_args(argv).directory):
        print(path)


if __name__ == "__main__":
    main()
