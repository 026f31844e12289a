"""The writer's queue (pairlane.workqueue): small work first, each request's work in order."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pairlane.workqueue import Job, WorkQueue


def job(name, keys, big=False) -> Job:
    return Job(name, None if keys is None else frozenset(keys), big)


def order(q: WorkQueue) -> list:
    out = []
    while (j := q.take()) is not None:
        out.append(j.work)
    return out


def fill(*jobs, max_overtakes=16) -> WorkQueue:
    q = WorkQueue(max_overtakes)
    for j in jobs:
        q.put(j)
    return q


def test_small_work_of_other_requests_goes_before_big_chunks():
    q = fill(job("A0", {"A"}, big=True), job("A1", {"A"}, big=True), job("B", {"B"}), job("C", {"C"}))
    assert order(q) == ["B", "C", "A0", "A1"]
    assert q.overtaken_total == 2


def test_work_of_the_same_request_never_overtakes():
    q = fill(job("A0", {"A"}, big=True), job("A-end", {"A"}), job("B", {"B"}))
    assert order(q) == ["B", "A0", "A-end"]


def test_small_work_behind_one_that_must_wait_waits_too():
    # "AB" shares A with the big chunk, so it waits; "B" shares B with "AB", so it waits behind it
    q = fill(job("A0", {"A"}, big=True), job("AB", {"A", "B"}), job("B", {"B"}), job("C", {"C"}))
    assert order(q) == ["C", "A0", "AB", "B"]


def test_a_barrier_overtakes_nothing_and_is_overtaken_by_nothing():
    q = fill(job("A0", {"A"}, big=True), job("sweep", None), job("B", {"B"}))
    assert order(q) == ["A0", "sweep", "B"]
    q = fill(job("A0", {"A"}, big=True), job("B", {"B"}), job("sweep", None))
    assert order(q) == ["B", "A0", "sweep"]


def test_work_with_no_keys_may_go_first():
    q = fill(job("A0", {"A"}, big=True), job("tick", set()))
    assert order(q) == ["tick", "A0"]


def test_small_work_in_front_keeps_its_order_and_big_work_is_not_starved():
    q = fill(job("B", {"B"}), job("C", {"C"}))
    assert order(q) == ["B", "C"]
    q = fill(job("A0", {"A"}, big=True), *[job(f"s{i}", {f"s{i}"}) for i in range(5)], max_overtakes=2)
    assert order(q) == ["s0", "s1", "A0", "s2", "s3", "s4"]


def test_empty_queue_gives_nothing():
    q = WorkQueue()
    assert q.take() is None and len(q) == 0


JOBS = st.lists(st.tuples(st.sets(st.sampled_from("ABCD"), max_size=2), st.booleans(), st.booleans()),
                max_size=30)


@settings(max_examples=300, deadline=None)
@given(JOBS, st.integers(1, 4))
def test_every_job_comes_out_once_and_jobs_sharing_a_key_keep_their_order(specs, max_overtakes):
    q = WorkQueue(max_overtakes)
    jobs = [Job(i, None if barrier else frozenset(keys), big) for i, (keys, big, barrier) in enumerate(specs)]
    puts = iter(jobs)
    taken = []
    # interleave puts and takes, as the actor and the database thread do
    for j in puts:
        q.put(j)
        if j.work % 3 == 0:
            taken.append(q.take())
    while (j := q.take()) is not None:
        taken.append(j)
    taken = [j for j in taken if j is not None]
    assert sorted(j.work for j in taken) == list(range(len(jobs)))
    pos = {j.work: n for n, j in enumerate(taken)}
    for a in jobs:
        for b in jobs:
            if a.work < b.work and (a.keys is None or b.keys is None or a.keys & b.keys):
                assert pos[a.work] < pos[b.work], (a, b)
