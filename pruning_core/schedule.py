"""Step schedules for feature caching (DeepCache / DaTo), as plain values.

A :class:`Schedule` says, for every sampling step, how much of the UNet runs:

- **FULL** — the whole UNet runs and every cache is refreshed;
- **SHALLOW(d)** — only the outer ``d`` input/output block pairs run (``input_blocks[0..d-1]``
  and their mirrored output blocks); everything deeper returns the features cached on the
  last FULL step (DeepCache's "branch", DaTo's cache value ``v = d``);
- **REUSE** — nothing runs; the step returns the previous step's prediction unchanged
  (DaTo's ``v = 0``).

The schedule is data only: it knows nothing about how blocks are skipped (that is the job of
``nodes/hooks/dato_cache.py``). It can be printed, parsed, compared, resampled
to another step count and costed.

Text syntax (what ``str()`` prints and :meth:`Schedule.parse` reads)
--------------------------------------------------------------------
A schedule is a sequence of step tokens, case-insensitive, optionally separated by spaces
or commas::

    F        a full step
    S<d>     a shallow step of depth d >= 1 ("S" alone means S1)
    R        a reuse step
    <tok>x<n>  the token repeated n times (run length), e.g. S1x3 = S1 S1 S1

Examples::

    "F S1 S1 R S1 F"          six steps
    "F,S1x3,R"                = F S1 S1 S1 R
    "FS2S2RRF"                separators are optional between tokens
    "F S1x4 F S1x4"           DeepCache, interval 5, depth 1, 10 steps

``str()`` prints the canonical form: tokens separated by single spaces, runs of two or
more identical steps as ``<tok>x<n>``. ``Schedule.parse(str(s)) == s`` always holds.

Invariant: the first step is FULL (a shallow or reuse step needs something cached before
it), so no shallow/reuse step can precede the first full one.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

FULL, SHALLOW, REUSE = "full", "shallow", "reuse"


class Step(NamedTuple):
    """One step of a schedule: ``(kind, depth)``; depth is 0 except for SHALLOW."""

    kind: str
    depth: int = 0

    @classmethod
    def full(cls) -> "Step":
        return cls(FULL, 0)

    @classmethod
    def shallow(cls, depth: int) -> "Step":
        return cls(SHALLOW, int(depth))

    @classmethod
    def reuse(cls) -> "Step":
        return cls(REUSE, 0)

    def cost_rank(self) -> tuple[int, int]:
        """Orders steps by how much they compute: REUSE < SHALLOW(1) < SHALLOW(2) < … < FULL."""
        return {REUSE: (0, 0), SHALLOW: (1, self.depth), FULL: (2, 0)}[self.kind]

    def __str__(self) -> str:
        return {FULL: "F", REUSE: "R"}.get(self.kind) or f"S{self.depth}"


# One token: kind letter, optional depth digits, optional run length "x<n>".
_TOKEN = re.compile(r"([FRS])(\d*)(?:[xX](\d+))?", re.IGNORECASE)
_SEPARATORS = " \t\r\n,"


@dataclass(frozen=True)
class Schedule:
    """An immutable per-step list of :class:`Step` (see the module docstring)."""

    steps: tuple[Step, ...]

    def __post_init__(self):
        steps = tuple(Step(*s) for s in self.steps)
        object.__setattr__(self, "steps", steps)
        if not steps:
            raise ValueError("a schedule needs at least one step")
        for i, s in enumerate(steps):
            if s.kind not in (FULL, SHALLOW, REUSE):
                raise ValueError(f"step {i}: unknown kind {s.kind!r} (expected {FULL!r}, {SHALLOW!r} or {REUSE!r})")
            if s.kind == SHALLOW and s.depth < 1:
                raise ValueError(f"step {i}: a shallow step needs a depth of at least 1, got {s.depth}")
            if s.kind != SHALLOW and s.depth != 0:
                raise ValueError(f"step {i}: a {s.kind} step takes no depth, got {s.depth}")
        if steps[0].kind != FULL:
            raise ValueError(f"step 0 is {steps[0]}, but the first step must be F (full): "
                             f"a shallow or reuse step needs a full step before it to fill the cache")

    # ---- text form --------------------------------------------------------------------

    def __str__(self) -> str:
        out, i = [], 0
        while i < len(self.steps):
            j = i
            while j + 1 < len(self.steps) and self.steps[j + 1] == self.steps[i]:
                j += 1
            run = j - i + 1
            out.append(f"{self.steps[i]}x{run}" if run > 1 else str(self.steps[i]))
            i = j + 1
        return " ".join(out)

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        """Read the text syntax of the module docstring; ValueError names the bad token and where it is."""
        if not isinstance(text, str):
            raise ValueError(f"schedule must be a string, got {type(text).__name__}")
        steps: list[Step] = []
        pos = 0
        while pos < len(text):
            if text[pos] in _SEPARATORS:
                pos += 1
                continue
            m = _TOKEN.match(text, pos)
            if m is None:
                bad = re.match(r"[^\s,]+", text[pos:]).group(0)
                raise ValueError(f"schedule {text!r}: cannot read {bad!r} at character {pos} (step {len(steps)}); "
                                 f"expected F, R, S<depth> or one of them followed by x<count>, e.g. 'F S1x3 R'")
            letter, digits, count = m.group(1).upper(), m.group(2), m.group(3)
            token = m.group(0)
            if letter in "FR" and digits:
                raise ValueError(f"schedule {text!r}: {token!r} at character {pos} (step {len(steps)}): "
                                 f"{letter} takes no depth (only S<depth> does)")
            if letter == "S":
                depth = int(digits) if digits else 1
                if depth < 1:
                    raise ValueError(f"schedule {text!r}: {token!r} at character {pos} (step {len(steps)}): "
                                     f"shallow depth must be at least 1")
                step = Step.shallow(depth)
            else:
                step = Step.full() if letter == "F" else Step.reuse()
            n = int(count) if count is not None else 1
            if n < 1:
                raise ValueError(f"schedule {text!r}: {token!r} at character {pos} (step {len(steps)}): "
                                 f"run length must be at least 1")
            if not steps and step.kind != FULL:
                raise ValueError(f"schedule {text!r}: {token!r} at character {pos} is the first step, but the "
                                 f"first step must be F (full): a shallow or reuse step needs a cache to read")
            steps.extend([step] * n)
            pos = m.end()
        if not steps:
            raise ValueError(f"schedule {text!r} is empty; write at least 'F'")
        return cls(tuple(steps))

    # ---- sequence access --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        return iter(self.steps)

    def __getitem__(self, i: int) -> Step:
        return self.steps[i]

    # ---- counts and cost --------------------------------------------------------------

    @property
    def full_count(self) -> int:
        return sum(s.kind == FULL for s in self.steps)

    @property
    def shallow_count(self) -> int:
        return sum(s.kind == SHALLOW for s in self.steps)

    @property
    def reuse_count(self) -> int:
        return sum(s.kind == REUSE for s in self.steps)

    @property
    def max_depth(self) -> int:
        """Deepest shallow step (0 when there is none)."""
        return max((s.depth for s in self.steps if s.kind == SHALLOW), default=0)

    @property
    def min_depth(self) -> int:
        """Shallowest shallow step (0 when there is none): blocks of rank ≥ it must be cacheable."""
        return min((s.depth for s in self.steps if s.kind == SHALLOW), default=0)

    def ideal_speedup(self, shallow_cost: float = 0.13, reuse_cost: float = 0.0) -> float:
        """``T / (full + shallow_cost·shallow + reuse_cost·reuse)``: the speedup if a full step
        costs 1, a shallow step ``shallow_cost`` and a reuse step ``reuse_cost`` (fractions of
        a full step; 0.13 is a rough depth-1 estimate for SD1.5 — measure for your model).
        Ignores token pruning and per-step overheads (sampler, VAE, text encoder)."""
        cost = self.full_count + shallow_cost * self.shallow_count + reuse_cost * self.reuse_count
        return len(self.steps) / cost

    # ---- transformations --------------------------------------------------------------

    def resample(self, n_steps: int, *, keep_refreshes: bool = False) -> "Schedule":
        """Map this schedule onto ``n_steps`` steps by relative position.

        Target step ``j`` covers the stretch ``[j·T/n, (j+1)·T/n)`` of the ``T`` source steps.

        Default, **share-preserving**: step 0 stays FULL and every kind of step (F, each
        shallow depth, R) keeps its share of the other ``T − 1`` source steps among the other
        ``n − 1`` target steps, so the schedule stays about as fast as the source (DaTo's
        50-step list: 3 full / 8 shallow / 9 reused at 20 steps). Target step ``j`` of those
        takes the kind the run owes most — the overlap-weighted source steps covered so far
        minus the steps already given out (error diffusion; ties go to the more computing
        kind) — so each kind's count is within one of its share and its steps sit near where
        the source has them.

        ``keep_refreshes=True``, **every refresh kept**: source step ``i`` lands on target
        ``⌊i·n/T⌋`` and a target takes the most computing of the source steps that land on it
        (FULL > deeper SHALLOW > REUSE; a target nothing lands on copies source ``⌊j·T/n⌋``).
        Cached features are then never staler, relative to the whole run, than in the source,
        so short runs get proportionally more FULL steps and less speedup (DaTo's list keeps
        its 5 full steps at 20 steps); a whole-multiple stretch repeats every source step.

        Both: ``resample(len(self))`` is ``self`` and ``resample(1)`` is ``F``.
        """
        n = int(n_steps)
        if n < 1:
            raise ValueError(f"cannot resample a schedule to {n_steps} steps; need at least 1")
        t = len(self.steps)
        if keep_refreshes:
            landed: list[list[Step]] = [[] for _ in range(n)]
            for i, s in enumerate(self.steps):
                landed[i * n // t].append(s)
            return Schedule(tuple(max(group, key=Step.cost_rank) if group else self.steps[j * t // n]
                                  for j, group in enumerate(landed)))
        # Step 0 is FULL at every step count (the invariant), so it is carried over as it is and
        # the other T - 1 source steps are shared out over the other n - 1 target steps.
        head, tail, m = self.steps[0], self.steps[1:], n - 1
        if not tail:
            return Schedule((head,) * n)
        owed: dict[Step, Fraction] = {}
        out = [head]
        for j in range(m):
            lo, hi = Fraction(j * len(tail), m), Fraction((j + 1) * len(tail), m)
            for i in range(int(lo), math.ceil(hi)):
                covered = min(hi, i + 1) - max(lo, i)
                owed[tail[i]] = owed.get(tail[i], 0) + covered * m / len(tail)
            pick = max(owed, key=lambda s: (owed[s], s.cost_rank()))
            owed[pick] -= 1
            out.append(pick)
        return Schedule(tuple(out))

    def clamp_depth(self, max_depth: int) -> "Schedule":
        """Fit shallow depths to a model with ``max_depth`` usable block pairs.

        Deeper shallow steps become SHALLOW(max_depth) (the nearest thing the model can do,
        and it computes *more*, never less, than a reuse). With ``max_depth`` 0 (no block pair
        can run alone) shallow steps become FULL: the safe direction, at the cost of speed.
        """
        m = int(max_depth)
        if m < 0:
            raise ValueError(f"max_depth must be >= 0, got {max_depth}")

        def fit(s: Step) -> Step:
            if s.kind != SHALLOW or s.depth <= m:
                return s
            return Step.shallow(m) if m >= 1 else Step.full()

        return Schedule(tuple(fit(s) for s in self.steps))

    # ---- presets ----------------------------------------------------------------------

    @classmethod
    def of(cls, steps: Iterable[Step | tuple[str, int]]) -> "Schedule":
        return cls(tuple(steps))

    @classmethod
    def pruning_only(cls, n_steps: int) -> "Schedule":
        """Every step FULL: no feature caching (token pruning alone)."""
        _check_steps(n_steps)
        return cls((Step.full(),) * n_steps)

    @classmethod
    def deepcache(cls, n_steps: int, interval: int, depth: int = 1) -> "Schedule":
        """DeepCache's uniform schedule: FULL every ``interval`` steps (from step 0), SHALLOW(depth) between."""
        _check_steps(n_steps)
        if interval < 1:
            raise ValueError(f"cache interval must be >= 1, got {interval}")
        if depth < 1:
            raise ValueError(f"shallow depth must be >= 1, got {depth}")
        return cls(tuple(Step.full() if s % interval == 0 else Step.shallow(depth) for s in range(n_steps)))

    @classmethod
    def from_dato_strategy(cls, values: Sequence[int], n_steps: int | None = None) -> "Schedule":
        """Turn an official DaTo per-call ``cache_strategy`` list into a per-step schedule.

        Official semantics (docs/algorithms.md §3.5): UNet call 0 is always full and call
        ``c ≥ 1`` uses ``values[c−1]``; ``v ≥ 2`` full (the code uses 2, 11, 12, 13 alike),
        ``1`` shallow depth 1, ``0`` reuse. The lists were made for 50-step PLMS, whose first
        step evaluates the UNet twice (at t₀ and at t₁), so 50 steps take 51 calls and the
        call of step ``s ≥ 1`` is ``c = s + 1``, i.e. ``values[s]``.

        Our mapping keeps that timestep alignment: step 0 FULL, step ``s ≥ 1`` ← ``values[s]``.
        Only ``values[0]`` is dropped — the PLMS-only extra evaluation inside step 0, which a
        one-call-per-step sampler does not have. The result (``len(values)`` steps) is then
        resampled to ``n_steps`` if given.
        """
        vals = [int(v) for v in values]
        if not vals:
            raise ValueError("empty DaTo strategy")
        if any(v < 0 for v in vals):
            raise ValueError(f"DaTo strategy values must be >= 0, got {min(vals)}")

        def step(v: int) -> Step:
            return Step.full() if v >= 2 else Step.shallow(1) if v == 1 else Step.reuse()

        sched = cls((Step.full(),) + tuple(step(v) for v in vals[1:]))
        return sched if n_steps is None else sched.resample(n_steps)

    @classmethod
    def dato_search_old(cls, n_steps: int = 50) -> "Schedule":
        """The schedule of DaTo's final COCO-30k runs ("search_old", §3.5), made for 50 steps.

        At 50 steps: 5 FULL (steps 0, 13, 23, 35, 45), 20 SHALLOW(1), 25 REUSE; ideal speedup
        50 / (5 + 0.13·20) ≈ 6.6×. (The official 51-call PLMS run has one more shallow call,
        the extra evaluation of step 0 — see :meth:`from_dato_strategy`.)
        """
        return cls.from_dato_strategy(DATO_SEARCH_OLD, n_steps)

    @classmethod
    def aggressive(cls, n_steps: int = 50) -> "Schedule":
        """Ours, not the paper's: a search_old-like pattern tuned to ≈ 9× ideal speedup at 50 steps.

        Four FULL steps (0, 14, 28, 40) instead of five, 12 SHALLOW(1) and 34 REUSE; shallow
        steps are densest early (where structure forms, as in search_old) and reuse runs
        never exceed four steps (search_old has runs of six). Ideal speedup at shallow cost
        0.13: 50 / (4 + 0.13·12) ≈ 9.0×. Not validated for image quality by anyone.
        """
        return cls.parse(AGGRESSIVE_50).resample(n_steps)


def _check_steps(n_steps: int) -> None:
    if int(n_steps) < 1:
        raise ValueError(f"a schedule needs at least 1 step, got {n_steps}")


# DaTo "search_old" per-call cache strategy: official run files
# `sd1/.ipynb_checkpoints/run_command7/8/9-checkpoint.py` (docs/algorithms.md §3.5).
DATO_SEARCH_OLD: tuple[int, ...] = (
    1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 12, 1, 0, 0, 0, 1, 1, 0, 1, 0, 12, 0,
    0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 12, 0, 0, 0, 0, 0, 0, 1, 0, 1, 12, 0, 1, 0, 1,
)

# Our ~9x preset for 50 steps (see Schedule.aggressive), one line per full-step segment.
AGGRESSIVE_50 = " ".join((
    "F S R S Rx2 S Rx2 S Rx2 S R",  # steps 0-13
    "F Rx2 S Rx3 S Rx3 S Rx2",      # steps 14-27
    "F Rx3 S Rx3 S Rx3",            # steps 28-39
    "F Rx3 S Rx4 S",                # steps 40-49
))
