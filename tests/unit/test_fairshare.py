"""The fair share's pure logic, explored: work-conserving, caps respected (a request
wider than its tenant's cap or the engine's batch refused), slots accounted on every
exit, and the VTC bound: two tenants backlogged throughout never drift apart in weighted
service by more than what can be in flight plus one request."""

from __future__ import annotations

import random

import pytest
from exploration import SEED, announce, examples
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from vllm_lora_ext.server.fairshare import FairShare, Ticket


def check_invariants(fs: FairShare, live: list[Ticket]) -> None:
    granted = [t for t in live if t.granted and not t.done]
    assert fs.running == sum(t.slots for t in granted)
    assert fs.waiting == sum(len(t.queue) for t in fs.tenants.values())
    for name, tenant in fs.tenants.items():
        mine = [t for t in granted if t.tenant == name]
        assert tenant.running == sum(t.slots for t in mine)
        if tenant.max_in_flight is not None:  # a wider request is refused...
            alone = len(mine) == 1 and mine[0].front  # ...but for a continuation alone
            assert tenant.running <= tenant.max_in_flight or alone
    assert fs.running <= fs.capacity
    eligible = [t for t in fs.tenants.values() if t.eligible()]
    if eligible:  # work-conserving: what waits could not be admitted
        pick = min(eligible, key=lambda t: (t.service, t.running, t.order))
        assert fs.running + pick.queue[0].slots > fs.limit(pick) and fs.running > 0


@settings(max_examples=examples(local=300), deadline=None, derandomize=False)
@seed(SEED)
@given(
    capacity=st.integers(1, 6),
    reserve=st.integers(0, 2),
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=2, max_size=4),
    caps=st.lists(st.one_of(st.none(), st.integers(1, 4)), min_size=4, max_size=4),
    script=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(1, 50)), max_size=80
    ),
)
def _random_traffic(capacity, reserve, weights, caps, script):
    fs = FairShare(capacity, reserve=min(reserve, capacity - 1))
    names = [f"t{i}" for i in range(len(weights))]
    for name, w, cap in zip(names, weights, caps, strict=False):
        fs.configure(name, weight=w, max_in_flight=cap)
    live: list[Ticket] = []
    for who, what, size in script:
        name = names[who % len(names)]
        if what == 0:  # a request, n up to 3: granted at once (submit's first step), or queued
            # A continuation (front) was admitted once: never wider than the engine,
            # maybe wider than a cap lowered since (then it runs when its tenant idles).
            front = size % 7 == 0
            slots = min(1 + size % 3, fs.capacity) if front else 1 + size % 3
            ticket = Ticket(name, slots=slots, front=front)
            cap = fs.settings(name)[1]
            if not front and (slots > fs.capacity or (cap is not None and slots > cap)):
                before = (fs.running, fs.waiting)
                with pytest.raises(ValueError, match=f"n={slots} is more than"):
                    if not fs.grant_now(ticket):  # as the gate asks
                        fs.submit(ticket)
                assert not ticket.granted and (fs.running, fs.waiting) == before
                continue
            live.append(ticket)
            at_once = not fs.waiting and fs._fits(fs._tenant(name), ticket.slots)
            assert fs.grant_now(ticket) == at_once == ticket.granted
            if not at_once:
                fs.submit(ticket, front=front)
        elif what == 1:  # one running request ends, having made `size` tokens
            running = [t for t in live if t.granted and not t.done]
            if running:
                done = running[size % len(running)]
                fs.charge(done.tenant, size)
                fs.release(done)
        else:  # a waiting one is aborted or disconnects
            waiting = [t for t in live if not t.granted and not t.done]
            if waiting:
                fs.release(waiting[size % len(waiting)])
        check_invariants(fs, live)


def test_random_traffic_keeps_the_invariants():
    announce()
    _random_traffic()


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0), (2.0, 0.5)])
def test_two_backlogged_tenants_stay_within_the_vtc_bound(weights):
    """Both always backlogged (A floods, B keeps a few queued), random request sizes
    charged as they finish: weighted service apart by at most what can be in flight plus
    one request, all along, and the long-run split follows the weights."""
    rng = random.Random(SEED)
    capacity, biggest = 4, 60
    fs = FairShare(capacity)
    fs.configure("A", weight=weights[0])
    fs.configure("B", weight=weights[1])
    cost: dict[Ticket, int] = {}

    def take(grants: list[Ticket]) -> None:
        for t in grants:
            cost[t] = rng.randint(1, biggest)

    bound = (capacity + 1) * biggest / min(weights)
    for step in range(3000):
        for name, depth in (("A", 40), ("B", 3)):
            while fs.queued(name) < depth:
                take(fs.submit(Ticket(name)))
        ticket = rng.choice(list(cost))
        fs.charge(ticket.tenant, cost.pop(ticket))
        take(fs.release(ticket))
        a, b = fs.tenants["A"], fs.tenants["B"]
        assert abs(a.service - b.service) <= bound, (step, a.service, b.service)
    a, b = fs.tenants["A"].tokens, fs.tenants["B"].tokens
    assert b / (a + b) == pytest.approx(weights[1] / sum(weights), abs=0.05)


def test_a_lone_tenant_gets_every_slot_and_caps_hold():
    fs = FairShare(4)
    tickets = [Ticket("A") for _ in range(10)]
    granted = [g for t in tickets for g in fs.submit(t)]
    assert len(granted) == 4 and fs.queued("A") == 6  # work-conserving
    fs.charge("A", 40)
    fs.configure("B", max_in_flight=1)
    b = [Ticket("B"), Ticket("B")]
    for t in b:
        fs.submit(t)
    fs.release(tickets[0])
    assert b[0].granted and not b[1].granted  # B goes next (least service)...
    fs.release(tickets[1])
    assert not b[1].granted  # ...but never beyond its cap
    fs.release(b[0])
    assert b[1].granted


def test_a_newly_backlogged_tenant_banks_no_credit_and_continuations_keep_their_place():
    fs = FairShare(1)
    first = Ticket("A")
    fs.submit(first)
    fs.charge("A", 1000)
    fs.release(first)
    fs.submit(Ticket("B"))  # B runs
    queued_a = [Ticket("A") for _ in range(3)]
    for t in queued_a:
        fs.submit(t)
    late = Ticket("C")  # idle until now: lifted to the least backlogged counter (A's)
    fs.submit(late)
    assert fs.tenants["C"].service == fs.tenants["A"].service
    cont = Ticket("A")
    fs.submit(cont, front=True)
    assert fs.tenants["A"].queue[0] is cont


def test_settings_are_validated():
    fs = FairShare(2)
    for bad in (0, float("inf"), float("nan"), 1e-9, 1e9):
        with pytest.raises(ValueError, match="weight"):
            fs.configure("A", weight=bad)
    with pytest.raises(ValueError, match="weight"):
        FairShare(2, weights={"A": float("inf")})
    assert fs.settings("A") == (1.0, None)  # nothing refused was kept
    with pytest.raises(ValueError):
        fs.configure("A", max_in_flight=0)
    with pytest.raises(ValueError):
        FairShare(0)


def test_settings_are_bounded_and_a_refused_change_changes_nothing():
    """An admin route that kept a setting for any name would grow without bound: a
    setting back to its default is dropped, and at most ``max_tenants`` names keep one."""
    fs = FairShare(2, max_tenants=2)
    fs.configure("A", weight=2.0)
    fs.configure("B", max_in_flight=3)
    with pytest.raises(ValueError, match="at most 2 tenants"):
        fs.configure("C", weight=0.5)
    fs.configure("C", weight=1.0, max_in_flight=None)  # defaults: nothing to keep
    fs.configure("A", weight=4.0, max_in_flight=1)  # a name that has one may change it
    assert fs.settings_count() == 2 and fs.settings("C") == (1.0, None)
    fs.configure("B", max_in_flight=None)  # back to the default: dropped...
    fs.configure("C", weight=0.5)  # ...which makes room
    assert fs.settings("C") == (0.5, None) and fs.settings_count() == 2
    # Both parts are checked before either applies.
    with pytest.raises(ValueError, match="max_in_flight"):
        fs.configure("A", weight=8.0, max_in_flight=0)
    assert fs.settings("A") == (4.0, 1)


def test_a_new_weight_applies_to_the_tokens_after_it_and_a_lift_keeps_the_count():
    """The counter is derived from the tokens received (a charge is one addition, per
    streamed token): what came before a weight change keeps the weight it came under."""
    fs = FairShare(2)
    fs.submit(Ticket("A"))
    a = fs.tenants["A"]
    a.tokens += 10
    assert a.service == 10
    fs.configure("A", weight=2.0)
    assert a.service == 10  # not 5: those tokens were served at weight 1
    a.charge(10)
    assert a.service == 15 and a.tokens == 20
    a.service = 100.0  # VTC's lift moves the counter...
    a.tokens += 4
    assert a.service == 102 and a.tokens == 24  # ...not what it received


def test_priorities_keep_their_meaning_within_a_tenant():
    fs = FairShare(1)
    fs.submit(Ticket("A"))  # runs
    low, high, cont = Ticket("A", priority=5), Ticket("A", priority=-1), Ticket("A")
    for t in (low, high):
        fs.submit(t)
    fs.submit(cont, front=True)
    assert list(fs.tenants["A"].queue) == [cont, high, low]


def test_a_gone_name_leaves_no_counter_but_keeps_its_settings():
    fs = FairShare(1)
    fs.configure("meow", weight=2.0)
    t = Ticket("meow")
    fs.submit(t)
    fs.forget("meow")  # running: kept
    assert "meow" in fs.tenants
    fs.release(t)
    fs.forget("meow")
    assert "meow" not in fs.tenants and fs.settings("meow") == (2.0, None)


def test_an_idle_tenant_carries_no_debt_from_long_ago():
    """B was served a lot yesterday; today A floods. B's next request goes at once."""
    fs = FairShare(1)
    old = Ticket("B")
    fs.submit(old)
    fs.charge("B", 100_000)
    fs.release(old)
    flood = [Ticket("A") for _ in range(5)]
    for t in flood:
        fs.submit(t)
    fs.charge("A", 50)
    b = Ticket("B")
    fs.submit(b)
    assert fs.tenants["B"].service == fs.tenants["A"].service
    fs.release(flood[0])
    assert b.granted


def test_the_reserve_lets_a_newcomer_run_at_once_beside_a_flood():
    """A floods a batch of 8 (+2 headroom) with a reserve of 3 (the headroom and one
    slot of the batch): A holds at most 7; B, arriving with nothing running, is admitted
    at once; B's second request waits like A's (the reserve is for tenants with nothing
    running)."""
    fs = FairShare(10, reserve=3)
    flood = [Ticket("A") for _ in range(20)]
    for t in flood:
        fs.submit(t)
    assert sum(t.granted for t in flood) == 7
    b1, b2 = Ticket("B"), Ticket("B")
    assert fs.submit(b1) == [b1]
    assert fs.submit(b2) == [] and not b2.granted
    first, second = [t for t in flood if t.granted][:2]
    fs.charge("A", 50)
    # Running tenants share 7 slots: A's finish leaves 6 + B's 1; a second one makes room,
    # and B, having received less, goes next.
    assert fs.release(first) == []
    assert fs.release(second) == [b2]
    with pytest.raises(ValueError, match="reserve"):
        FairShare(4, reserve=4)
