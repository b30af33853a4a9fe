"""Step schedules: text round trips, parse errors, resampling invariants, presets and costs."""
import dataclasses

import pytest

from token_pruning_cache.pruning_core.schedule import (AGGRESSIVE_50, DATO_SEARCH_OLD, FULL, REUSE, SHALLOW,
                                                       Schedule, Step)

F, R = Step.full(), Step.reuse()


def S(d=1):
    return Step.shallow(d)


def kinds(s):
    return [step.kind for step in s]


def first_full(s):
    return kinds(s).index(FULL)


def assert_invariants(s, n):
    assert len(s) == n
    assert s[0] == F
    assert first_full(s) == 0  # nothing shallow/reuse before the first full step
    assert s.full_count + s.shallow_count + s.reuse_count == n


# ---- text form ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,steps", [
    ("F", [F]),
    ("F S1 S1 R S1 F", [F, S(), S(), R, S(), F]),
    ("F,S1x3,R", [F, S(), S(), S(), R]),
    ("FS2S2RRF", [F, S(2), S(2), R, R, F]),
    ("f s r", [F, S(1), R]),
    ("  F ,, Sx2\nR  ", [F, S(), S(), R]),
    ("F S12x2 Rx3", [F, S(12), S(12), R, R, R]),
    ("Fx3", [F, F, F]),
])
def test_parse(text, steps):
    assert list(Schedule.parse(text)) == steps


@pytest.mark.parametrize("steps,text", [
    ([F], "F"),
    ([F, S(), S(), S(), R], "F S1x3 R"),
    ([F, S(2), R, R, S(3), F, F], "F S2 Rx2 S3 Fx2"),
])
def test_str_is_canonical(steps, text):
    assert str(Schedule.of(steps)) == text


@pytest.mark.parametrize("sched", [
    Schedule.dato_search_old(), Schedule.aggressive(), Schedule.deepcache(50, 5, 2),
    Schedule.pruning_only(20), Schedule.dato_search_old(7), Schedule.parse("F S3 S1 R F S1x10 Rx2"),
])
def test_round_trip(sched):
    text = str(sched)
    assert Schedule.parse(text) == sched
    assert str(Schedule.parse(text)) == text
    assert Schedule.parse(text.lower()) == sched


@pytest.mark.parametrize("text,fragments", [
    ("F S1 Q R", ["'Q'", "character 5", "step 2"]),
    ("F S1 x3", ["'x3'", "character 5", "step 2"]),
    ("F F2", ["'F2'", "character 2", "takes no depth"]),
    ("F R1", ["'R1'", "takes no depth"]),
    ("F S0", ["'S0'", "at least 1"]),
    ("F Rx0", ["'Rx0'", "run length"]),
    ("S1 F", ["'S1'", "first step must be F"]),
    ("Rx2", ["first step must be F"]),
    ("", ["empty"]),
    (" , ", ["empty"]),
    ("F S1-R", ["'-R'", "character 4"]),
])
def test_parse_errors_name_the_token_and_position(text, fragments):
    with pytest.raises(ValueError) as err:
        Schedule.parse(text)
    for frag in fragments:
        assert frag in str(err.value), (frag, str(err.value))


def test_parse_rejects_non_string():
    with pytest.raises(ValueError, match="string"):
        Schedule.parse(["F"])


# ---- value type --------------------------------------------------------------------------

def test_immutable_and_hashable():
    s = Schedule.parse("F S1 R")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = ()
    assert isinstance(s.steps, tuple)
    assert hash(s) == hash(Schedule.parse("F,S1,R"))
    assert {s: 1}[Schedule.parse("FSR")] == 1


def test_steps_unpack_as_kind_depth():
    kind, depth = Schedule.parse("F S3")[1]
    assert (kind, depth) == (SHALLOW, 3)
    assert tuple(Schedule.parse("F")[0]) == (FULL, 0)
    assert tuple(Step.reuse()) == (REUSE, 0)


@pytest.mark.parametrize("steps,match", [
    ([], "at least one step"),
    ([R, F], "first step must be F"),
    ([F, (SHALLOW, 0)], "depth of at least 1"),
    ([F, (REUSE, 2)], "takes no depth"),
    ([F, ("skip", 0)], "unknown kind"),
])
def test_constructor_validates(steps, match):
    with pytest.raises(ValueError, match=match):
        Schedule.of(steps)


def test_counts_and_depths():
    s = Schedule.parse("F S2 S1 R R F S3")
    assert (s.full_count, s.shallow_count, s.reuse_count) == (2, 3, 2)
    assert (s.min_depth, s.max_depth) == (1, 3)
    assert Schedule.parse("F R").max_depth == 0 and Schedule.parse("F R").min_depth == 0


# ---- resampling --------------------------------------------------------------------------

SOURCES = [Schedule.dato_search_old(), Schedule.aggressive(), Schedule.deepcache(50, 5),
           Schedule.parse("F R S2 R S1 F Rx4"), Schedule.parse("F")]


@pytest.mark.parametrize("keep_refreshes", [False, True], ids=["share", "keep_refreshes"])
@pytest.mark.parametrize("src", SOURCES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 7, 10, 20, 49, 50, 51, 100, 137])
def test_resample_invariants(src, n, keep_refreshes):
    out = src.resample(n, keep_refreshes=keep_refreshes)
    assert_invariants(out, n)
    # every kind in the output exists in the source (nothing invented)
    assert set(out) <= set(src)


@pytest.mark.parametrize("src", SOURCES, ids=str)
@pytest.mark.parametrize("n", [2, 7, 10, 20, 30, 49, 51, 100, 137])
def test_resample_keeps_each_kinds_share(src, n):
    # step 0 stays FULL; every kind's count among the other n - 1 steps is within one step of
    # its share of the source's other T - 1 steps
    out = src.resample(n)
    if len(src) == 1:
        assert out == Schedule((F,) * n)
        return
    for kind in set(src):
        share = src.steps[1:].count(kind) / (len(src) - 1)
        assert abs(out.steps[1:].count(kind) - share * (n - 1)) < 1, kind


def test_resample_keeps_each_kinds_place():
    # the k-th step of a kind lands near where the source has its k-th step of that kind
    src = Schedule.dato_search_old()
    out = src.resample(20)
    assert (out.full_count, out.shallow_count, out.reuse_count) == (3, 8, 9)
    src_full = [i / 50 for i, s in enumerate(src) if s == F]  # 0, .26, .46, .70, .90
    out_full = [j / 20 for j, s in enumerate(out) if s == F]
    for x in out_full:
        assert min(abs(x - y) for y in src_full) <= 0.1


@pytest.mark.parametrize("src", SOURCES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 10, 20, 49, 50, 51, 100, 137])
def test_resample_keep_refreshes(src, n):
    out = src.resample(n, keep_refreshes=True)
    if n <= len(src):
        # no refresh is lost: every source FULL lands on a FULL target step
        t = len(src)
        for i, step in enumerate(src):
            if step == F:
                assert out[i * n // t] == F
        assert out.full_count <= src.full_count
    else:
        # stretching: every source FULL still lands on a FULL target step (refreshes are never
        # thinned out), and the refreshes keep their share of the run to within one source step
        t = len(src)
        for i, step in enumerate(src):
            if step == F:
                assert out[i * n // t] == F, (i, i * n // t)
        assert out.full_count >= src.full_count
        assert abs(out.full_count / n - src.full_count / t) <= 1 / t
    if n % len(src) == 0:
        # whole-multiple stretch keeps proportions, hence the ideal speedup
        assert out.ideal_speedup() == pytest.approx(src.ideal_speedup())


@pytest.mark.parametrize("keep_refreshes", [False, True], ids=["share", "keep_refreshes"])
@pytest.mark.parametrize("src", SOURCES, ids=str)
def test_resample_to_same_length_is_identity(src, keep_refreshes):
    assert src.resample(len(src), keep_refreshes=keep_refreshes) == src


@pytest.mark.parametrize("keep_refreshes", [False, True], ids=["share", "keep_refreshes"])
def test_resample_to_one_step_is_full(keep_refreshes):
    assert str(Schedule.dato_search_old().resample(1, keep_refreshes=keep_refreshes)) == "F"


def test_resample_share_keeps_the_ideal_speedup():
    # the point of the default: DaTo's 50-step list stays a fast schedule at other step counts
    src = Schedule.dato_search_old()
    assert src.ideal_speedup() == pytest.approx(6.58, abs=0.01)
    for n in (20, 25, 30, 100):
        assert src.resample(n).ideal_speedup() > 4.9
        assert src.resample(n, keep_refreshes=True).ideal_speedup() <= src.ideal_speedup()
    assert src.resample(20, keep_refreshes=True).full_count == 5


def test_resample_keeps_refreshes_when_shrinking():
    # a point sample of DeepCache interval 5 at 7 steps would keep only step 0's refresh;
    # every 7-step bin of a 50-step interval-5 schedule contains a refresh
    assert Schedule.deepcache(50, 5).resample(7, keep_refreshes=True) == Schedule.pruning_only(7)
    # search_old's 5 refreshes survive at 10 steps
    ten = Schedule.dato_search_old().resample(10, keep_refreshes=True)
    assert ten.full_count == 5 and ten[0] == F


def test_resample_prefers_deeper_shallow_over_reuse():
    s = Schedule.parse("F R S1 R S3 R")
    assert str(s.resample(3, keep_refreshes=True)) == "F S1 S3"
    # share: ties between equally owed kinds go to the more computing one
    assert str(Schedule.parse("F S1 R").resample(4)) == "F S1x2 R"


def test_resample_rejects_zero_steps():
    with pytest.raises(ValueError, match="at least 1"):
        Schedule.dato_search_old().resample(0)


# ---- depth clamping ----------------------------------------------------------------------

def test_clamp_depth():
    s = Schedule.parse("F S1 S3 R S5")
    assert str(s.clamp_depth(3)) == "F S1 S3 R S3"
    assert s.clamp_depth(10) == s
    assert str(s.clamp_depth(0)) == "Fx3 R F"  # no block pair can run alone: shallow -> full
    with pytest.raises(ValueError):
        s.clamp_depth(-1)


# ---- presets and costs -------------------------------------------------------------------

def test_search_old_mapping_and_counts():
    s = Schedule.dato_search_old()
    assert len(DATO_SEARCH_OLD) == 50
    assert_invariants(s, 50)
    # step 0 FULL, step s >= 1 <- strategy[s] (strategy[0] was PLMS's extra call inside step 0)
    for i in range(1, 50):
        v = DATO_SEARCH_OLD[i]
        assert s[i] == (F if v >= 2 else S(1) if v == 1 else R)
    assert [i for i, step in enumerate(s) if step == F] == [0, 13, 23, 35, 45]
    assert (s.full_count, s.shallow_count, s.reuse_count) == (5, 20, 25)
    # the official 51-call PLMS run: call 0 + 50 values -> 5 full, 21 shallow, 25 reuse
    official = [F] + [F if v >= 2 else S(1) if v == 1 else R for v in DATO_SEARCH_OLD]
    assert (official.count(F), official.count(S(1)), official.count(R)) == (5, 21, 25)


def test_search_old_ideal_speedup():
    s = Schedule.dato_search_old()
    assert s.ideal_speedup() == pytest.approx(50 / (5 + 0.13 * 20))  # ≈ 6.58
    assert s.ideal_speedup(shallow_cost=0.13) == pytest.approx(6.579, abs=1e-3)
    assert s.ideal_speedup(shallow_cost=0.0) == pytest.approx(10.0)
    assert s.ideal_speedup(shallow_cost=0.13, reuse_cost=0.02) == pytest.approx(50 / (5 + 2.6 + 0.5))


def test_from_dato_strategy():
    s = Schedule.from_dato_strategy([1, 0, 1, 12, 2, 11, 0])
    assert str(s) == "F R S1 Fx3 R"
    assert len(Schedule.from_dato_strategy(DATO_SEARCH_OLD, 20)) == 20
    with pytest.raises(ValueError):
        Schedule.from_dato_strategy([])
    with pytest.raises(ValueError):
        Schedule.from_dato_strategy([1, -1])


def test_deepcache_interval_5():
    s = Schedule.deepcache(50, 5)
    assert (s.full_count, s.shallow_count, s.reuse_count) == (10, 40, 0)
    assert [i for i, step in enumerate(s) if step == F] == list(range(0, 50, 5))
    assert set(step for step in s if step != F) == {S(1)}
    assert str(Schedule.deepcache(10, 5, depth=3)) == "F S3x4 F S3x4"
    assert Schedule.deepcache(5, 1) == Schedule.pruning_only(5)
    with pytest.raises(ValueError):
        Schedule.deepcache(50, 0)
    with pytest.raises(ValueError):
        Schedule.deepcache(50, 5, depth=0)


def test_pruning_only():
    s = Schedule.pruning_only(30)
    assert (s.full_count, s.shallow_count, s.reuse_count) == (30, 0, 0)
    assert s.ideal_speedup() == 1.0
    with pytest.raises(ValueError):
        Schedule.pruning_only(0)


def test_aggressive_preset():
    s = Schedule.aggressive()
    assert_invariants(s, 50)
    assert s == Schedule.parse(AGGRESSIVE_50)
    assert (s.full_count, s.shallow_count, s.reuse_count) == (4, 12, 34)
    assert s.ideal_speedup() == pytest.approx(9.0, abs=0.05)
    assert s.ideal_speedup() > Schedule.dato_search_old().ideal_speedup()
    # no reuse run longer than four steps
    assert "Rx5" not in str(s) and "Rx6" not in str(s)
    assert_invariants(Schedule.aggressive(20), 20)
