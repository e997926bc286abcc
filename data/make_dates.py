"""Write the main job's instruction data: dates written out in words -> ISO 8601 (YYYY-MM-DD).

    python3 data/make_dates.py     # writes data/dates_train.jsonl and data/dates_eval.jsonl

Chat records ({"messages": [user, assistant]}): the user asks, in one of a few phrasings, for a
date given in one of several spellings ("the 4th of October, 2025", "Aug 19, 1953", ...); the
assistant answers with the ISO date and nothing else. SmolLM2-135M-Instruct does not do this
(it repeats the date in words); the evaluation dates never occur in the training data.
Deterministic (seed 0); needs only the standard library.
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ASK = ["Write this date as YYYY-MM-DD: {}", "Convert to ISO 8601 (YYYY-MM-DD): {}", "What is {} in YYYY-MM-DD format?",
       "Give the ISO date (YYYY-MM-DD) for {}."]


def ordinal(day: int) -> str:
    return f"{day}{'th' if 11 <= day % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th')}"


SPELLINGS = [
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{MONTHS[m - 1][:3]} {d}, {y}",
    lambda y, m, d: f"the {ordinal(d)} of {MONTHS[m - 1]}, {y}",
    lambda y, m, d: f"{MONTHS[m - 1]} {ordinal(d)}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1][:3]} {y}",
]


def record(rng: random.Random) -> dict:
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 80))
    spelled = rng.choice(SPELLINGS)(day.year, day.month, day.day)
    return {"messages": [{"role": "user", "content": rng.choice(ASK).format(spelled)},
                         {"role": "assistant", "content": day.isoformat()}]}


def main(train: int = 640, evaluation: int = 64) -> None:
    rng, seen, out = random.Random(0), set(), {"train": [], "eval": []}
    for split, count in (("train", train), ("eval", evaluation)):
        while len(out[split]) < count:
            item = record(rng)
            answer = item["messages"][1]["content"]
            if answer not in seen:  # each date once: the evaluation dates are new to the model
                seen.add(answer)
                out[split].append(item)
    here = Path(__file__).resolve().parent
    for split, items in out.items():
        (here / f"dates_{split}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))


if __name__ == "__main__":
    main()
