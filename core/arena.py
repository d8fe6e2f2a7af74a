"""The blind arena: a teacher's round of prompts and models, students' votes on anonymous pairs, a leaderboard.

A round fixes its prompts, its models (library adapters and the base, BASE), one base model and one set of
sampling settings with one seed, so every model's text for a prompt is one fixed text, generated once by the
engine and kept with the round. A voter is handed one pair at a time, in a random order as "A" and "B", and
never a pair holding a model they own; the server remembers which pair it handed out, so a vote names only
its choice and cannot be cast on a pair nobody was shown. Each voter votes once per pair. Names are revealed
with the vote's answer.

The leaderboard is a Bradley-Terry fit (as FastChat's arena): a tie or "both bad" counts half a win to each
side; the intervals are percentiles of fits to bootstrap resamples of the votes.

Storage: one JSON file per round in the arena folder, replaced atomically after every change.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import random
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from core import atomic, safe_json
from core.checks import check_text

BASE = "(base)"  # the base model's name in a round (no library name starts with a bracket)
CHOICES = ("a", "b", "tie", "bad")  # A better, B better, a tie, both bad
MAX_PROMPTS = 20  # prompts in one round
MAX_MODELS = 12  # models in one round (66 pairs per prompt)
MAX_TITLE = 80
ROUND_ID = re.compile(r"r[0-9a-f]{8}")
BOOTSTRAP = 200  # resamples for the leaderboard's intervals
MAX_ROUND_BYTES = 64 * 2**20  # a round file read at start-up (30 voters x 1,000 votes is ~3 MB)
PRIOR_TIE = 0.1  # a virtual tie between every two models: a model that only lost keeps a finite rating


class ArenaError(ValueError):
    """A request the arena refuses (the message says why, in one sentence)."""


@dataclass
class Sampling:
    """How every text of a round is generated (one seed: each model's text for a prompt is fixed)."""
    max_new_tokens: int = 60  # new tokens per text
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 1234


@dataclass
class Round:
    id: str  # 'r' + 8 hex digits, its file's name
    title: str
    base_model: str  # the preset every model runs on
    prompts: list[str]
    models: list[str]  # library adapter names, and BASE
    owners: dict[str, str]  # model -> the signed-in user who owns it, as recorded when the round opened
    sampling: Sampling
    opened_by: str | None = None
    created: float = field(default_factory=time.time)
    open: bool = True  # closed rounds keep their leaderboard and take no more votes
    texts: dict[str, str] = field(default_factory=dict)  # "<prompt index>|<model>" -> its generated text
    votes: list[dict] = field(default_factory=list)  # {voter, prompt, a, b, winner, time}; a, b as shown

    def pairs(self) -> list[tuple[int, str, str]]:
        """Every (prompt index, model, model) this round can show, each pair of models once per prompt."""
        return [(p, a, b) for p in range(len(self.prompts)) for a, b in itertools.combinations(self.models, 2)]

    def summary(self) -> dict:
        return {"id": self.id, "title": self.title, "open": self.open, "models": len(self.models),
                "prompts": len(self.prompts), "votes": len(self.votes)}


@dataclass
class Pair:
    """What a voter is shown: a prompt and two anonymous texts."""
    round_id: str
    prompt: str
    text_a: str
    text_b: str


def _key(prompt: int, model: str) -> str:
    return f"{prompt}|{model}"


def _pair_id(prompt: int, a: str, b: str) -> tuple:
    return (prompt, *sorted((a, b)))


class Arena:
    """Every round in `root` (a folder, made on first write), safe to use from many threads."""

    def __init__(self, root):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._rounds: dict[str, Round] = {}
        self._shown: dict[tuple[str, str], tuple[int, str, str]] = {}  # (voter, round) -> the pair handed out
        self._rng = random.Random()
        self._load()

    # ---- rounds ---------------------------------------------------------------------------

    def open_round(self, title, base_model: str, prompts, models: Sequence[str], owners: dict[str, str],
                   sampling: Sampling, opened_by: str | None = None) -> Round:
        """A new open round. `owners`: model -> owner (the voter name that may not vote on it)."""
        title = check_text(title, "the round's title", MAX_TITLE).strip() or "Arena round"
        prompts = _check_prompts(prompts)
        models = list(dict.fromkeys(models))
        if len(models) < 2:
            raise ArenaError("choose at least two models for the round (adapters, or the base and an adapter).")
        if len(models) > MAX_MODELS:
            raise ArenaError(f"choose at most {MAX_MODELS} models for one round (got {len(models)}).")
        rnd = Round(f"r{secrets.token_hex(4)}", title, base_model, prompts, models,
                    {m: o for m, o in owners.items() if m in models and o}, sampling, opened_by)
        with self._lock:
            self._rounds[rnd.id] = rnd
            self._save(rnd)
        return rnd

    def close_round(self, round_id: str) -> Round:
        with self._lock:
            rnd = self._get(round_id)
            rnd.open = False
            self._save(rnd)
            return rnd

    def rounds(self) -> list[Round]:
        """Newest first."""
        with self._lock:
            return sorted(self._rounds.values(), key=lambda r: -r.created)

    def get(self, round_id) -> Round:
        with self._lock:
            return self._get(round_id)

    # ---- voting ---------------------------------------------------------------------------

    def next_pair(self, round_id, voter: str, generate: Callable[[Round, int, list[str]], list[str]]) -> Pair | None:
        """Hand `voter` the next pair to judge (None: nothing left for them), generating texts not made yet with
        `generate(round, prompt index, models)` -> their texts. The pair with the fewest votes comes first."""
        with self._lock:
            rnd = self._get(round_id)
            if not rnd.open:
                raise ArenaError(f"the round '{rnd.title}' is closed; pick an open round.")
            choice = self._shown.get((voter, rnd.id)) or self._choose(rnd, voter)
            if choice is None:
                return None
            self._shown[(voter, rnd.id)] = choice
            p, a, b = choice
            missing = [m for m in (a, b) if _key(p, m) not in rnd.texts]
        if missing:  # generated outside the lock: other voters go on meanwhile
            texts = generate(rnd, p, missing)
            with self._lock:
                for m, t in zip(missing, texts):
                    rnd.texts.setdefault(_key(p, m), t)
                self._save(rnd)
        return Pair(rnd.id, rnd.prompts[p], rnd.texts[_key(p, a)], rnd.texts[_key(p, b)])

    def vote(self, round_id, voter: str, winner: str) -> dict:
        """Record `voter`'s verdict on the pair last handed to them; returns the names behind A and B."""
        if winner not in CHOICES:
            raise ArenaError(f"a vote is one of {', '.join(CHOICES)} (got {str(winner)[:20]!r}).")
        with self._lock:
            rnd = self._get(round_id)
            if not rnd.open:
                raise ArenaError(f"the round '{rnd.title}' is closed; its votes are final.")
            shown = self._shown.pop((voter, rnd.id), None)
            if shown is None:
                raise ArenaError("there is no pair to vote on; press 'Next pair' first.")
            p, a, b = shown
            rnd.votes.append({"voter": voter, "prompt": p, "a": a, "b": b, "winner": winner, "time": time.time()})
            self._save(rnd)
        return {"a": a, "b": b, "winner": winner}

    # ---- results --------------------------------------------------------------------------

    def leaderboard(self, round_id, bootstrap: int = BOOTSTRAP) -> list[dict]:
        """Models by Bradley-Terry rating: rating, 95% interval, votes, wins, ties, losses."""
        rnd = self.get(round_id)
        votes = list(rnd.votes)
        rating = bradley_terry(rnd.models, votes)
        rng = np.random.default_rng(0)  # the same votes give the same intervals
        samples = [bradley_terry(rnd.models, [votes[i] for i in rng.integers(0, len(votes), len(votes))])
                   for _ in range(bootstrap if votes else 0)]
        rows = []
        for m in rnd.models:
            won = sum(1 for v in votes if _winner(v) == m)
            tied = sum(1 for v in votes if m in (v["a"], v["b"]) and v["winner"] in ("tie", "bad"))
            played = sum(1 for v in votes if m in (v["a"], v["b"]))
            low, high = (np.percentile([s[m] for s in samples], [2.5, 97.5]) if samples else (rating[m], rating[m]))
            rows.append({"model": m, "rating": round(rating[m], 1), "low": round(float(low), 1),
                         "high": round(float(high), 1), "votes": played, "wins": won, "ties": tied,
                         "losses": played - won - tied})
        return sorted(rows, key=lambda r: -r["rating"])

    def export_json(self, round_id) -> str:
        rnd = self.get(round_id)
        return json.dumps({**_as_dict(rnd), "leaderboard": self.leaderboard(round_id)}, indent=1)

    def export_csv(self, round_id) -> str:
        rnd = self.get(round_id)
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["round", "prompt", "model_a", "model_b", "winner", "voter", "time"])
        for v in rnd.votes:
            w.writerow([rnd.id, rnd.prompts[v["prompt"]], v["a"], v["b"], v["winner"], v["voter"],
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v["time"]))])
        return out.getvalue()

    def export(self, round_id, fmt: str, dest_dir) -> Path:
        """<dest_dir>/arena-<round>.<fmt> (csv or json), published whole (core.atomic.publish_file)."""
        if fmt not in ("csv", "json"):
            raise ValueError("choose csv or json.")
        rnd = self.get(round_id)
        text = self.export_csv(rnd.id) if fmt == "csv" else self.export_json(rnd.id)
        return atomic.publish_file(Path(dest_dir) / f"arena-{rnd.id}.{fmt}",
                                   lambda tmp: tmp.write_text(text, encoding="utf-8"))

    # ---- internals ------------------------------------------------------------------------

    def _get(self, round_id) -> Round:
        if not isinstance(round_id, str) or round_id not in self._rounds:
            raise ArenaError("no such arena round; pick one from the list.")
        return self._rounds[round_id]

    def _choose(self, rnd: Round, voter: str) -> tuple[int, str, str] | None:
        done = {_pair_id(v["prompt"], v["a"], v["b"]) for v in rnd.votes if v["voter"] == voter}
        mine = {m for m, owner in rnd.owners.items() if owner == voter}
        counts: dict[tuple, int] = {}
        for v in rnd.votes:
            k = _pair_id(v["prompt"], v["a"], v["b"])
            counts[k] = counts.get(k, 0) + 1
        left = [(p, a, b) for p, a, b in rnd.pairs() if _pair_id(p, a, b) not in done and not {a, b} & mine]
        if not left:
            return None
        fewest = min(counts.get(_pair_id(*x), 0) for x in left)
        p, a, b = self._rng.choice([x for x in left if counts.get(_pair_id(*x), 0) == fewest])
        return (p, a, b) if self._rng.random() < 0.5 else (p, b, a)

    def _save(self, rnd: Round) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.root / f"{rnd.id}.json", json.dumps(_as_dict(rnd)))

    def _load(self) -> None:
        """Rounds saved before; a file that does not read as a round is skipped (it never breaks the arena)."""
        if not self.root.is_dir():
            return
        for f in sorted(self.root.glob("r*.json")):
            if not ROUND_ID.fullmatch(f.stem):
                continue
            try:
                rnd = _from_dict(safe_json.load_file(f, MAX_ROUND_BYTES))
            except (OSError, ValueError, TypeError, KeyError):
                continue
            if rnd.id == f.stem:
                self._rounds[rnd.id] = rnd


def _winner(v: dict) -> str | None:
    return v["a"] if v["winner"] == "a" else v["b"] if v["winner"] == "b" else None


def bradley_terry(models: Sequence[str], votes: Sequence[dict], iters: int = 200) -> dict[str, float]:
    """Ratings on the Elo scale (1000 = the geometric mean of strengths, +400 = 10 times the odds) fitted
    by the minorisation-maximisation algorithm (Hunter, 2004) to the votes' wins, a tie counting half to each."""
    idx = {m: i for i, m in enumerate(models)}
    n = len(models)
    wins = np.full((n, n), PRIOR_TIE / 2)
    np.fill_diagonal(wins, 0.0)
    for v in votes:
        a, b = idx[v["a"]], idx[v["b"]]
        if v["winner"] == "a":
            wins[a, b] += 1
        elif v["winner"] == "b":
            wins[b, a] += 1
        else:
            wins[a, b] += 0.5
            wins[b, a] += 0.5
    games = wins + wins.T
    strength = np.ones(n)
    for _ in range(iters):
        denom = (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        strength = wins.sum(axis=1) / denom
        strength /= math.exp(np.log(strength).mean())
    return {m: 1000 + 400 * math.log10(strength[i]) for m, i in idx.items()}


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = prompts.splitlines()
    if not isinstance(prompts, (list, tuple)):
        raise ArenaError("the prompts are text, one prompt per line.")
    out = [check_text(p, "a prompt", 2000).strip() for p in prompts]
    out = list(dict.fromkeys(p for p in out if p))
    if not out:
        raise ArenaError("write at least one prompt for the round, one per line.")
    if len(out) > MAX_PROMPTS:
        raise ArenaError(f"a round takes at most {MAX_PROMPTS} prompts (got {len(out)}).")
    return out


def _as_dict(rnd: Round) -> dict:
    return asdict(rnd)


def _from_dict(d: dict) -> Round:
    return Round(**{**d, "sampling": Sampling(**d["sampling"])})
