"""Check: a yes/no question as a guard. SUCCESS when the node answers what the guard expects, FAILURE
on the other answer, on an unsure one (never a guess: see `yes_no.verdict`) and on every failure
Ask has (an error, a refusal, a time-out). `<key>/verdict` says which: "yes", "no" or "unsure", so
a tree can tell "the door is closed" from "could not tell".

    Check("door open?", "Is the door on the left open?")                  # SUCCESS on yes
    Check("door closed?", "Is the door on the left open?", expect=False)  # SUCCESS on no
"""

from __future__ import annotations

import py_trees

from .ask import Ask
from .yes_no import NO, UNSURE, YES, verdict

Status = py_trees.common.Status


class Check(Ask):
    """Ask's parameters, plus `expect`: the answer (True: yes, False: no) that makes it succeed."""

    def __init__(self, name: str, question: str | None = None, *, expect: bool = True, **ask):
        super().__init__(name, question, **ask)
        self.expect = YES if expect else NO
        self.blackboard.register_key(key="verdict", access=py_trees.common.Access.WRITE)

    def initialise(self):
        self.blackboard.verdict = ""
        super().initialise()

    def ended(self, status: int, result) -> Status:
        outcome = super().ended(status, result)
        if outcome != Status.SUCCESS:
            return outcome
        said = verdict(result.answer)
        self.blackboard.verdict = said
        if said == UNSURE:
            return self._fail(f"unsure answer {result.answer!r}: not a plain yes or no")
        if said != self.expect:
            return self._fail(f"answered {result.answer!r}; the guard needs {self.expect}")
        return Status.SUCCESS
