"""The rule that turns an answer into yes, no or unsure, for the Check leaf. No ROS, no py_trees.

    verdict("Yes.") == "yes"    verdict("No, it is closed.") == "no"    verdict("Maybe.") == "unsure"

An answer is "yes" when its first word is "yes", "no" when its first word is "no", and in both
cases only if no word of it hedges (HEDGES: "No idea", "Yes, I think so" are unsure). Anything else
is "unsure": an empty answer, a sentence without yes or no ("The door is open."), a hedge. A guard
fails on unsure; it never guesses what a free-form answer meant.
"""

from __future__ import annotations

import re

YES, NO, UNSURE = "yes", "no", "unsure"

# Words that make a yes or a no unsure. Lower case; the answer's words are compared whole.
HEDGES = frozenset({"maybe", "perhaps", "possibly", "probably", "unsure", "sure", "idea", "know", "unclear",
                    "uncertain", "think", "guess", "might", "cannot", "can't", "or"})


def verdict(answer: str) -> str:
    """"yes", "no" or "unsure" for an answer text (see the module's rule)."""
    words = re.findall(r"[a-z']+", answer.lower())
    if not words or words[0] not in (YES, NO) or HEDGES.intersection(words[1:]):
        return UNSURE
    return words[0]
