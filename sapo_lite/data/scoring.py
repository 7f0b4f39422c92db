"""How good answers are on held-out data: pure functions of texts and examples.

Two scores, chosen by the data: where examples carry constraints (constraints.py),
the share of constraints the greedy answers satisfy, per kind and overall, the share of prompts
with every constraint satisfied, and answer correctness where rows carry an answer; examples
without constraints count exact matches with the reference response. The base (adapters off)
against the policy is the before/after figure of a run; `sapo-lite eval` shows every role.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .constraints import answer_correct, check
from .examples import Example

ROLE_LABELS = {"base": "base (adapters off)", "policy": "trained policy", "ema": "EMA adapter",
               "best": "best validation step's policy"}


def counted(number: int, noun: str) -> str:
    """`1 prompt`, `3 prompts`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def held_out_metric(examples: Sequence[Example]) -> str:
    """What a run's before/after figure measures on these examples."""
    return "instruction following" if any(ex.constraints for ex in examples) else "exact match"


@dataclass
class Tally:
    hits: int = 0
    total: int = 0

    def add(self, hit: bool) -> None:
        self.hits += int(hit)
        self.total += 1

    @property
    def rate(self) -> float:
        return self.hits / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "total": self.total, "rate": round(self.rate, 4)}


@dataclass
class RoleScore:
    """What one role's greedy answers achieve on a set of examples; `to_dict()` is plain JSON."""

    role: str
    prompts: int = 0
    constraints: Tally = field(default_factory=Tally)  # every constraint of every prompt
    per_kind: dict[str, Tally] = field(default_factory=dict)
    prompts_satisfied: Tally = field(default_factory=Tally)  # prompts with all their constraints met
    answers: Tally = field(default_factory=Tally)  # rows with a reference answer
    exact_match: Tally = field(default_factory=Tally)  # rows without constraints
    texts: list[str] = field(default_factory=list, repr=False)  # the answers scored, in the examples' order

    @property
    def headline(self) -> float:
        """The one figure of a before/after: constraints satisfied, or exact match without them."""
        return self.constraints.rate if self.constraints.total else self.exact_match.rate

    def describe(self) -> str:
        label = ROLE_LABELS.get(self.role, self.role)
        if self.constraints.total:
            return (f"held-out instruction following, {label}: [bold]{self.constraints.rate:.1%}[/] of "
                    f"{counted(self.constraints.total, 'constraint')} ({counted(self.prompts, 'prompt')})")
        return f"held-out exact match, {label}: [bold]{self.exact_match.rate:.1%}[/] of {self.exact_match.total}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "prompts": self.prompts}
        if self.constraints.total:
            out["constraints"] = self.constraints.to_dict()
            out["prompts_all_satisfied"] = self.prompts_satisfied.to_dict()
            out["per_kind"] = {kind: tally.to_dict() for kind, tally in sorted(self.per_kind.items())}
        if self.answers.total:
            out["answer_accuracy"] = self.answers.to_dict()
        if self.exact_match.total:
            out["exact_match"] = self.exact_match.to_dict()
        return out


def score_answers(role: str, answers: Sequence[str], examples: Sequence[Example]) -> RoleScore:
    """Score decoded answers against their examples' constraints, answers or reference responses."""
    score = RoleScore(role, prompts=len(examples), texts=list(answers))
    for text, ex in zip(answers, examples, strict=True):
        if ex.constraints:
            met = [check(text, c) for c in ex.constraints]
            for constraint, hit in zip(ex.constraints, met):
                score.constraints.add(hit)
                score.per_kind.setdefault(constraint["kind"], Tally()).add(hit)
            score.prompts_satisfied.add(all(met))
        else:
            score.exact_match.add(text == ex.response_text)
        if ex.answer is not None:
            score.answers.add(answer_correct(text, ex.answer))
    return score


def answer_records(examples: Sequence[Example], prompts: Sequence[str], scores: dict[str, RoleScore]) -> list[dict]:
    """One plain-JSON object a prompt, for a person to read what each role answered and which checks it passed:
    the prompt, the reference response, each role's answer, then per constraint whether each role met it, and
    answer correctness (rows with an `answer`) or exact match (rows without constraints)."""
    records = []
    for index, (example, prompt) in enumerate(zip(examples, prompts, strict=True)):
        answers = {role: score.texts[index] for role, score in scores.items()}
        record: dict[str, Any] = {"prompt": prompt, "reference": example.response_text, "answers": answers}
        if example.constraints:
            record["constraints"] = [{**constraint, "passed": {role: check(text, constraint)
                                                               for role, text in answers.items()}}
                                     for constraint in example.constraints]
        else:
            record["exact_match"] = {role: text == example.response_text for role, text in answers.items()}
        if example.answer is not None:
            record["answer"] = example.answer
            record["answer_correct"] = {role: answer_correct(text, example.answer) for role, text in answers.items()}
        records.append(record)
    return records
