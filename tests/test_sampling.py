"""Sampling strategies: statistics with seeded random sources, injected clocks, threads."""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from otlp_middleware.errors import ConfigurationError
from otlp_middleware.profiling import sampling
from otlp_middleware.profiling.sampling import (
    AdaptiveSampler,
    AlwaysSample,
    DecisionCounter,
    NeverSample,
    ParentBasedSampler,
    ProbabilisticSampler,
    RateSampler,
    RequestInfo,
    RuleSampler,
    SamplingStats,
    SamplingStrategy,
    decide,
    parse_sampler,
)

GET_ROOT = RequestInfo("GET", "/")


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class EveryOther(SamplingStrategy):
    """A user strategy in the plain no-argument form the issue promises keeps working."""

    def __init__(self) -> None:
        self.calls = 0
        self._counter = DecisionCounter()

    def should_sample(self) -> bool:  # type: ignore[override]
        self.calls += 1
        return self._counter.record(self.calls % 2 == 0)

    def reset(self) -> None:
        self.calls = 0
        self._counter.reset()

    def stats(self) -> SamplingStats:
        return self._counter.stats()


class PathRecorder(SamplingStrategy):
    """A request-aware user strategy: records the requests it is shown."""

    needs_request = True

    def __init__(self) -> None:
        self.seen: list[RequestInfo | None] = []

    def should_sample(self, request: RequestInfo | None = None) -> bool:
        self.seen.append(request)
        return request is not None and request.path.startswith("/reports/")

    def reset(self) -> None:
        self.seen.clear()

    def stats(self) -> SamplingStats:
        return SamplingStats(decisions=len(self.seen), sampled=0)


def run(strategy: SamplingStrategy, count: int, request: RequestInfo | None = None) -> int:
    return sum(decide(strategy, request) for _ in range(count))


def test_request_info_is_immutable() -> None:
    info = RequestInfo("GET", "/users/1", route="/users/{id}")
    assert (info.headers, info.trace_sampled) == ({}, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.path = "/other"  # type: ignore[misc]


# -- stats and the counting helper ---------------------------------------------------------


def test_stats_actual_rate() -> None:
    assert SamplingStats(decisions=0, sampled=0).actual_rate == 0.0
    assert SamplingStats(decisions=200, sampled=2).actual_rate == pytest.approx(0.01)


def test_decision_counter_counts_and_resets() -> None:
    counter = DecisionCounter()
    assert counter.record(True) is True
    assert counter.record(False) is False
    assert [counter.record_every(3) for _ in range(6)] == [True, False, False] * 2
    # decisions 3..8 are numbers 3..8: 3 and 6 are multiples of 3; record_every numbers all
    # decisions, including the two recorded before it.
    assert counter.stats() == SamplingStats(decisions=8, sampled=3)
    counter.reset()
    assert counter.stats() == SamplingStats(decisions=0, sampled=0)


def test_always_and_never() -> None:
    always, never = AlwaysSample(), NeverSample()
    assert run(always, 50) == 50
    assert run(never, 50, GET_ROOT) == 0
    assert always.stats() == SamplingStats(decisions=50, sampled=50)
    assert always.stats().actual_rate == 1.0
    assert never.stats() == SamplingStats(decisions=50, sampled=0)
    always.reset()
    assert always.stats() == SamplingStats(decisions=0, sampled=0)


def test_needs_request_only_for_request_aware_strategies() -> None:
    plain = [AlwaysSample(), NeverSample(), ProbabilisticSampler(0.5), RateSampler(2)]
    plain.append(AdaptiveSampler(10, clock=FakeClock()))
    assert not any(strategy.needs_request for strategy in plain)
    assert RuleSampler({}).needs_request
    assert ParentBasedSampler().needs_request
    assert not EveryOther.needs_request


# -- probabilistic -------------------------------------------------------------------------


@pytest.mark.parametrize("probability", [0.01, 0.1, 0.5, 0.9])
def test_probabilistic_rate_matches_probability(probability: float) -> None:
    sampler = ProbabilisticSampler(probability, random=random.Random(1234).random)
    decisions = 20_000
    sampled = run(sampler, decisions)
    # Five binomial standard deviations: fails only for a wrong rate, not by bad luck.
    tolerance = 5 * math.sqrt(probability * (1 - probability) / decisions)
    assert abs(sampled / decisions - probability) < tolerance
    assert sampler.stats() == SamplingStats(decisions=decisions, sampled=sampled)
    sampler.reset()
    assert sampler.stats() == SamplingStats(decisions=0, sampled=0)


def test_probabilistic_uses_the_random_seam() -> None:
    draws = random.Random(7)
    expected = [draws.random() < 0.3 for _ in range(1000)]
    sampler = ProbabilisticSampler(0.3, random=random.Random(7).random)
    assert [sampler.should_sample() for _ in range(1000)] == expected


def test_probabilistic_extremes_are_exact() -> None:
    # random() may return 0.0 but never 1.0: 0 must never sample, 1 must always.
    assert run(ProbabilisticSampler(0, random=lambda: 0.0), 100) == 0
    assert run(ProbabilisticSampler(1, random=lambda: 0.9999999999), 100) == 100


# -- rate ----------------------------------------------------------------------------------


def test_rate_samples_exactly_every_nth() -> None:
    sampler = RateSampler(4)
    decisions = [sampler.should_sample() for _ in range(12)]
    assert decisions == [False, False, False, True] * 3
    assert sampler.stats() == SamplingStats(decisions=12, sampled=3)
    assert run(RateSampler(1), 10) == 10


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every microsecond so races have every chance to show."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def decide_in_threads(
    strategy: SamplingStrategy, threads: int, per_thread: int, request: RequestInfo | None
) -> int:
    barrier = threading.Barrier(threads)
    sampled = [0] * threads

    def work(index: int) -> None:
        barrier.wait()
        sampled[index] = sum(decide(strategy, request) for _ in range(per_thread))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(sampled)


@pytest.mark.usefixtures("frequent_thread_switches")
def test_rate_is_exact_under_concurrent_threads() -> None:
    sampler = RateSampler(7)
    decisions = 8 * 5_000
    sampled = decide_in_threads(sampler, threads=8, per_thread=5_000, request=None)
    assert sampled == decisions // 7
    assert sampler.stats() == SamplingStats(decisions=decisions, sampled=decisions // 7)


@pytest.mark.usefixtures("frequent_thread_switches")
@pytest.mark.parametrize(
    "factory",
    [
        AlwaysSample,
        NeverSample,
        lambda: ProbabilisticSampler(0.5),
        lambda: AdaptiveSampler(100, clock=FakeClock()),
        lambda: RuleSampler({"/": "probabilistic:0.5"}),
        lambda: ParentBasedSampler(root="probabilistic:0.5"),
    ],
    ids=["always", "never", "probabilistic", "adaptive", "rules", "parentbased"],
)
def test_stats_are_exact_under_concurrent_threads(factory: Callable[[], SamplingStrategy]) -> None:
    strategy = factory()
    sampled = decide_in_threads(strategy, threads=6, per_thread=3_000, request=GET_ROOT)
    assert strategy.stats() == SamplingStats(decisions=18_000, sampled=sampled)


# -- adaptive ------------------------------------------------------------------------------


def offer(sampler: AdaptiveSampler, clock: FakeClock, per_second: int, seconds: int) -> list[int]:
    """Offer evenly spaced requests; return how many were sampled in each second."""
    start = clock.now
    per_bucket = [0] * seconds
    for i in range(per_second * seconds):
        clock.now = start + (i + 1) / per_second
        if sampler.should_sample():
            per_bucket[min((i + 1) // per_second, seconds - 1)] += 1
    return per_bucket


def test_adaptive_converges_to_target_as_offered_rate_changes() -> None:
    clock = FakeClock()
    sampler = AdaptiveSampler(50, clock=clock, random=random.Random(99).random)

    busy = offer(sampler, clock, per_second=1000, seconds=20)
    # The first window starts at probability 1; the per-window cap bounds that burst.
    assert busy[0] <= 100
    assert sum(busy[10:]) / 10 == pytest.approx(50, rel=0.15)
    assert sampler.probability == pytest.approx(50 / 1000, rel=0.05)

    quiet = offer(sampler, clock, per_second=100, seconds=20)
    assert sum(quiet[10:]) / 10 == pytest.approx(50, rel=0.15)
    assert sampler.probability == pytest.approx(50 / 100, rel=0.05)

    # Traffic jumps tenfold: the window in which it happens is still capped at twice the target.
    surge = offer(sampler, clock, per_second=1000, seconds=20)
    assert max(surge) <= 100
    assert sum(surge[10:]) / 10 == pytest.approx(50, rel=0.15)


def test_adaptive_samples_everything_below_target() -> None:
    clock = FakeClock()
    sampler = AdaptiveSampler(50, adjust_interval=2.0, clock=clock)
    offer(sampler, clock, per_second=10, seconds=10)
    assert sampler.stats() == SamplingStats(decisions=100, sampled=100)
    assert sampler.probability == 1.0


def test_adaptive_adjusts_per_interval_and_resets() -> None:
    clock = FakeClock()
    sampler = AdaptiveSampler(5, adjust_interval=2.0, clock=clock, random=lambda: 0.5)
    offer(sampler, clock, per_second=100, seconds=1)
    assert sampler.probability == 1.0  # the first 2 s window is not over yet
    offer(sampler, clock, per_second=100, seconds=2)
    assert sampler.probability == pytest.approx(5 / 100, rel=0.05)
    sampler.reset()
    assert sampler.probability == 1.0
    assert sampler.stats() == SamplingStats(decisions=0, sampled=0)


# -- rules ---------------------------------------------------------------------------------


def test_rules_match_route_then_path_and_methods_first_match_wins() -> None:
    every_second = RateSampler(2)
    rules = RuleSampler(
        {"/health*": "never", "POST,PUT /orders/*": "always", "/api/*": every_second},
        default="always",
    )
    assert not decide(rules, RequestInfo("GET", "/healthz"))
    assert decide(rules, RequestInfo("POST", "/orders/17"))
    assert rules.strategy_for(RequestInfo("GET", "/orders/17")) is rules.default
    # The route template wins over the raw path.
    api_route = RequestInfo("GET", "/users/1", route="/api/users/{id}")
    assert rules.strategy_for(api_route) is every_second
    assert rules.strategy_for(RequestInfo("GET", "/api/x", route="/users/{id}")) is rules.default
    assert [decide(rules, api_route) for _ in range(4)] == [False, True, False, True]
    # Without a request, the default decides.
    assert rules.strategy_for(None) is rules.default
    assert decide(rules, None)
    assert rules.stats() == SamplingStats(decisions=7, sampled=4)


def test_rules_sequence_form_orders_rules() -> None:
    rules = RuleSampler([("/api/*", ["get", "HEAD"], "always"), ("/api/*", None, "never")])
    assert decide(rules, RequestInfo("GET", "/api/a"))
    assert decide(rules, RequestInfo("HEAD", "/api/a"))
    assert not decide(rules, RequestInfo("POST", "/api/a"))
    assert isinstance(rules.default, NeverSample)
    assert not decide(rules, RequestInfo("GET", "/other"))


def test_rules_stay_right_for_many_distinct_paths() -> None:
    # More distinct raw paths than the sampler remembers matches for.
    rules = RuleSampler({"/static/*": "never"}, default="always")
    decisions = [
        (
            decide(rules, RequestInfo("GET", f"/static/{i}.css")),
            decide(rules, RequestInfo("GET", f"/page/{i}")),
        )
        for i in range(3000)
    ]
    assert decisions == [(False, True)] * 3000


def test_rules_reset_reaches_every_strategy() -> None:
    inner = RateSampler(3)
    rules = RuleSampler({"/a": inner}, default=AlwaysSample())
    run(rules, 5, RequestInfo("GET", "/a"))
    run(rules, 2, RequestInfo("GET", "/b"))
    assert inner.stats().decisions == 5
    rules.reset()
    assert inner.stats().decisions == 0
    assert rules.default.stats().decisions == 0
    assert rules.stats().decisions == 0


def test_rules_pass_the_request_to_user_strategies() -> None:
    recorder, plain = PathRecorder(), EveryOther()
    rules = RuleSampler({"/reports/*": recorder}, default=plain)
    request = RequestInfo("GET", "/reports/7", headers={"x-debug": "1"})
    assert decide(rules, request)
    assert recorder.seen == [request]
    assert [decide(rules, RequestInfo("GET", "/x")) for _ in range(2)] == [False, True]


@pytest.mark.parametrize(
    "rules",
    [
        42,
        "/x",
        [("/x",)],
        [("", None, "always")],
        [("/x", 5, "always")],
        [("/x", ["GET", " "], "always")],
        {"/x": 3},
        {1: "always"},
    ],
    ids=[
        "number",
        "string",
        "short-tuple",
        "empty-pattern",
        "bad-methods",
        "empty-method",
        "bad-strategy",
        "bad-key",
    ],
)
def test_rules_reject_malformed_rules(rules: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        RuleSampler(rules)  # type: ignore[arg-type]
    assert info.value.field == "rules"


def test_rules_reject_a_bad_spec() -> None:
    with pytest.raises(ConfigurationError, match="sampler='rate:0'"):
        RuleSampler({"/x": "rate:0"})


# -- parent based --------------------------------------------------------------------------


def test_parent_based_follows_the_incoming_trace() -> None:
    sampler = ParentBasedSampler(root=NeverSample())
    assert decide(sampler, RequestInfo("GET", "/", trace_sampled=True))
    assert not decide(ParentBasedSampler(), RequestInfo("GET", "/", trace_sampled=False))
    # No incoming trace (or no request at all): the root decides.
    assert not decide(sampler, RequestInfo("GET", "/"))
    assert not decide(sampler, None)
    assert decide(ParentBasedSampler(), None)
    assert sampler.stats() == SamplingStats(decisions=3, sampled=1)
    assert sampler.root.stats().decisions == 2
    sampler.reset()
    assert sampler.root.stats().decisions == 0


def test_parent_based_root_sees_the_request() -> None:
    recorder = PathRecorder()
    sampler = ParentBasedSampler(root=recorder)
    request = RequestInfo("GET", "/reports/1")
    assert decide(sampler, request)
    assert recorder.seen == [request]


# -- user strategies and decide() ----------------------------------------------------------


def test_no_argument_user_strategy_works_through_decide() -> None:
    strategy = EveryOther()
    assert [decide(strategy, GET_ROOT) for _ in range(4)] == [False, True, False, True]
    assert [decide(strategy) for _ in range(2)] == [False, True]
    assert strategy.stats() == SamplingStats(decisions=6, sampled=3)
    wrapped = ParentBasedSampler(root=EveryOther())
    assert [decide(wrapped, GET_ROOT) for _ in range(2)] == [False, True]


def test_decide_inspects_each_class_once(monkeypatch: pytest.MonkeyPatch) -> None:
    class FreshStrategy(EveryOther):
        pass

    calls = []
    real_signature = inspect.signature

    def counting_signature(obj: Callable[..., object]) -> inspect.Signature:
        calls.append(obj)
        return real_signature(obj)

    monkeypatch.setattr(inspect, "signature", counting_signature)
    first, second = FreshStrategy(), FreshStrategy()
    for _ in range(50):
        decide(first, GET_ROOT)
        decide(second, GET_ROOT)
    assert len(calls) == 1


def test_decide_calls_an_uninspectable_should_sample_without_the_request() -> None:
    class Uninspectable:
        """A callable whose signature cannot be read (like some C callables)."""

        @property
        def __signature__(self) -> inspect.Signature:
            raise ValueError("no signature")

        def __call__(self, *args: object) -> bool:
            return not args  # True only when called without the request

    class Opaque(EveryOther):
        should_sample = Uninspectable()  # type: ignore[assignment]

    assert decide(Opaque(), GET_ROOT) is True


def test_an_abstract_method_left_out_is_an_error() -> None:
    class Incomplete(SamplingStrategy):
        def should_sample(self, request: RequestInfo | None = None) -> bool:
            return True

    with pytest.raises(TypeError):
        Incomplete()  # type: ignore[abstract]


# -- argument validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: ProbabilisticSampler(-0.01), "probability"),
        (lambda: ProbabilisticSampler(1.01), "probability"),
        (lambda: ProbabilisticSampler(math.nan), "probability"),
        (lambda: ProbabilisticSampler("0.5"), "probability"),  # type: ignore[arg-type]
        (lambda: ProbabilisticSampler(True), "probability"),
        (lambda: ProbabilisticSampler(0.5, random="seeded"), "random"),  # type: ignore[arg-type]
        (lambda: RateSampler(0), "n"),
        (lambda: RateSampler(-3), "n"),
        (lambda: RateSampler(2.0), "n"),  # type: ignore[arg-type]
        (lambda: RateSampler("10"), "n"),  # type: ignore[arg-type]
        (lambda: RateSampler(True), "n"),
        (lambda: AdaptiveSampler(0), "target_per_second"),
        (lambda: AdaptiveSampler(-5), "target_per_second"),
        (lambda: AdaptiveSampler(math.inf), "target_per_second"),
        (lambda: AdaptiveSampler(None), "target_per_second"),  # type: ignore[arg-type]
        (lambda: AdaptiveSampler(5, 0), "adjust_interval"),
        (lambda: AdaptiveSampler(5, -1.0), "adjust_interval"),
        (lambda: AdaptiveSampler(5, clock=None), "clock"),  # type: ignore[arg-type]
    ],
)
def test_invalid_arguments_raise_configuration_error(
    factory: Callable[[], object], field: str
) -> None:
    with pytest.raises(ValueError) as info:
        factory()
    assert isinstance(info.value, ConfigurationError)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}=")


@pytest.mark.parametrize(
    ("strategy", "text"),
    [
        (AlwaysSample(), "AlwaysSample()"),
        (NeverSample(), "NeverSample()"),
        (ProbabilisticSampler(0.25), "ProbabilisticSampler(0.25)"),
        (RateSampler(10), "RateSampler(10)"),
        (AdaptiveSampler(5, 2), "AdaptiveSampler(5.0, 2.0)"),
        (RuleSampler({"/a": "never"}), "RuleSampler(<1 rules>, default=NeverSample())"),
        (ParentBasedSampler("rate:3"), "ParentBasedSampler(root=RateSampler(3))"),
    ],
)
def test_repr_names_the_configuration(strategy: SamplingStrategy, text: str) -> None:
    assert repr(strategy) == text


# -- specs ---------------------------------------------------------------------------------


def test_parse_sampler_round_trips() -> None:
    assert isinstance(parse_sampler("always"), AlwaysSample)
    assert isinstance(parse_sampler(" NEVER "), NeverSample)
    probabilistic = parse_sampler("probabilistic:0.1")
    assert isinstance(probabilistic, ProbabilisticSampler)
    assert probabilistic.probability == 0.1
    rate = parse_sampler("rate:100")
    assert isinstance(rate, RateSampler)
    assert rate.n == 100
    adaptive = parse_sampler("adaptive:50")
    assert isinstance(adaptive, AdaptiveSampler)
    assert (adaptive.target_per_second, adaptive.adjust_interval) == (50.0, 1.0)
    slow = parse_sampler("adaptive:50:2.5")
    assert isinstance(slow, AdaptiveSampler)
    assert slow.adjust_interval == 2.5
    parent = parse_sampler("parent")
    assert isinstance(parent, ParentBasedSampler)
    assert isinstance(parent.root, AlwaysSample)
    nested = parse_sampler("parentbased:rate:10")
    assert isinstance(nested, ParentBasedSampler)
    assert isinstance(nested.root, RateSampler)
    assert nested.root.n == 10


def test_parse_sampler_imports_classes_and_passes_strategies_through() -> None:
    assert isinstance(parse_sampler("otlp_middleware.profiling.sampling.NeverSample"), NeverSample)
    assert isinstance(
        parse_sampler("otlp_middleware.profiling.sampling:AlwaysSample"), AlwaysSample
    )
    user = parse_sampler(f"{__name__}.EveryOther")
    assert isinstance(user, EveryOther)
    assert [decide(user, GET_ROOT) for _ in range(2)] == [False, True]
    assert isinstance(parse_sampler(f"{__name__}:PathRecorder"), PathRecorder)
    assert isinstance(parse_sampler(EveryOther), EveryOther)
    instance = RateSampler(3)
    assert parse_sampler(instance) is instance


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "sometimes",
        "always:1",
        "probabilistic",
        "probabilistic:",
        "probabilistic:often",
        "probabilistic:1.5",
        "rate:0",
        "rate:2.5",
        "rate:ten",
        "adaptive:0",
        "adaptive:50:0",
        "adaptive:1:2:3",
        "parentbased:sometimes",
        "parentbased:",
        "no_such_module_for_sampling.Sampler",
        "otlp_middleware.profiling.sampling.NoSuchSampler",
        "otlp_middleware.profiling.sampling.RequestInfo",
        "otlp_middleware.profiling.sampling.RateSampler",
        "1bad.path",
        42,
        None,
    ],
)
def test_parse_sampler_rejects_bad_specs(spec: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_sampler(spec)  # type: ignore[arg-type]
    assert info.value.field == "sampler"
    assert info.value.value == spec
    assert str(info.value).startswith(f"sampler={spec!r}: ")


def test_parse_sampler_error_lists_the_allowed_forms() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_sampler("sometimes")
    for form in ("always", "never", "probabilistic:", "rate:", "adaptive:", "parentbased:"):
        assert form in info.value.allowed
    assert "package.module.ClassName" in info.value.allowed


def test_all_is_sorted_and_complete() -> None:
    public = {
        name
        for name, value in vars(sampling).items()
        if not name.startswith("_")
        and getattr(value, "__module__", None) == sampling.__name__
        and (inspect.isclass(value) or inspect.isfunction(value))
    }
    assert sampling.__all__ == sorted(sampling.__all__)
    assert set(sampling.__all__) == public
