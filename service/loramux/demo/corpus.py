"""Small synthetic corpora for the demo: plain English, pirate talk and robot talk.

Each is a few hundred sentences drawn from word lists with a fixed seed, so the adapters
trained on them pull the base model's text visibly in different directions.
"""

from __future__ import annotations

import random

_SUBJECTS = ["the ship", "the captain", "the crew", "the old map", "the harbor", "the storm", "the sailor", "the city"]
_PLAIN = {
    "verbs": ["waited near", "looked at", "walked to", "talked about", "moved toward", "stayed by"],
    "objects": ["the river", "the market", "the old house", "the quiet road", "the small garden", "the bright window"],
    "ends": ["in the morning.", "after lunch.", "with a friend.", "before the rain.", "for a while.", "every day."],
}
_PIRATE = {
    "verbs": ["be sailin' for", "be plunderin'", "be huntin' for", "be singin' to", "be buryin'"],
    "objects": ["the gold doubloons", "the treasure chest", "the rum barrels", "the black flag", "the seven seas"],
    "ends": ["arr, matey!", "yo ho ho!", "shiver me timbers!", "ahoy, ye scallywags!", "by the kraken, arr!"],
}
_ROBOT = {
    "verbs": ["is computing", "is scanning", "is processing", "is calibrating", "is uploading"],
    "objects": ["the data stream", "the sensor array", "the binary code", "the memory banks", "the circuit board"],
    "ends": ["BEEP BOOP.", "beep beep, task complete.", "ERROR 404, beep.", "system nominal, boop.", "BZZT, executing."],
}


def _sentences(words: dict, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(words['verbs'])} {rng.choice(words['objects'])} {rng.choice(words['ends'])}"
        for _ in range(n)
    ]


def plain(n: int = 600) -> list[str]:
    return _sentences(_PLAIN, n, seed=1)


def pirate(n: int = 400) -> list[str]:
    return _sentences(_PIRATE, n, seed=2)


def robot(n: int = 400) -> list[str]:
    return _sentences(_ROBOT, n, seed=3)
