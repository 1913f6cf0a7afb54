"""The job store and the state machine: transitions, idempotency keys, tokens."""

from __future__ import annotations

import pytest

from service.engine.states import InvalidTransition, JobNotFound, JobState, can_transition
from service.engine.store import IdempotencyConflict, Store, TokenNameTaken
from trainer.spec import JobSpec, SearchSpec


@pytest.fixture
def store(database_url: str) -> Store:
    s = Store(database_url)
    s.create_schema()
    yield s
    s.close()


def test_terminal_states_have_no_way_out() -> None:
    for old in JobState:
        for new in JobState:
            if old.is_terminal():
                assert not can_transition(old, new)
    assert can_transition(JobState.QUEUED, JobState.CANCELLED)
    assert not can_transition(JobState.QUEUED, JobState.RUNNING)  # must be submitted (STARTING) first
    assert not can_transition(JobState.RUNNING, JobState.QUEUED)


def test_happy_path_and_terminal_is_final(store: Store) -> None:
    job, created = store.create_job("alice", JobSpec.model_validate({"optim": {"epochs": 1}}))
    assert created and job.state is JobState.QUEUED and job.attempts == 0
    store.transition(job.id, JobState.STARTING, ray_submission_id=f"{job.id}-1", attempts=1)
    store.transition(job.id, JobState.RUNNING)
    done = store.transition(job.id, JobState.SUCCEEDED, best_val_acc=0.5)
    assert done.state is JobState.SUCCEEDED and done.best_val_acc == 0.5 and done.updated_at >= job.created_at
    for new in JobState:
        with pytest.raises(InvalidTransition):
            store.transition(job.id, new)
    assert store.update(job.id, message="late") is None  # a finished record is final
    assert store.get(job.id).message is None


def test_transition_checks_expected_state(store: Store) -> None:
    job, _ = store.create_job("alice", JobSpec())
    store.transition(job.id, JobState.CANCELLED, expect={JobState.QUEUED})
    with pytest.raises(InvalidTransition):
        store.transition(job.id, JobState.STARTING, expect={JobState.QUEUED})
    with pytest.raises(JobNotFound, match="nope"):
        store.transition("nope", JobState.CANCELLED)
    with pytest.raises(ValueError):
        store.update(job.id, state="RUNNING")


def test_ids_are_random_and_url_safe(store: Store) -> None:
    ids = {store.create_job("a", JobSpec())[0].id for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) >= 20 and all(c.isalnum() or c in "-_" for c in i) for i in ids)


def test_idempotency_key(store: Store) -> None:
    a, created_a = store.create_job("alice", JobSpec(seed=1), "k1", "h1")
    b, created_b = store.create_job("alice", JobSpec(seed=1), "k1", "h1")
    assert created_a and not created_b and a.id == b.id
    with pytest.raises(IdempotencyConflict):
        store.create_job("alice", JobSpec(seed=2), "k1", "h2")
    c, created_c = store.create_job("bob", JobSpec(seed=2), "k1", "h2")  # keys are per owner
    assert created_c and c.id != a.id


def test_list_filters_and_pages(store: Store) -> None:
    ids = [store.create_job("alice", JobSpec())[0].id for _ in range(5)]
    store.create_job("bob", JobSpec())
    store.transition(ids[0], JobState.CANCELLED)
    page, total = store.list(owner="alice", limit=2, offset=0)
    assert total == 5 and [j.id for j in page] == ids[::-1][:2]  # newest first
    page, total = store.list(owner="alice", limit=2, offset=4)
    assert [j.id for j in page] == [ids[0]]
    queued, total = store.list(owner="alice", states=[JobState.QUEUED])
    assert total == 4 and ids[0] not in {j.id for j in queued}
    assert [j.id for j in store.queued_in_order()][:4] == ids[1:]  # oldest first
    past_the_end, total = store.list(owner="alice", limit=2, offset=5)  # no row carries the total: counted
    assert past_the_end == [] and total == 5
    assert store.list(owner="carol") == ([], 0)
    # a page row carries its total, which is not part of the job: the same row is the same snapshot as get's
    page, _ = store.list(owner="alice", limit=1, offset=0)
    assert page[0] is store.get(ids[-1])


def test_a_poll_reads_its_token_and_job_in_one_go(store: Store) -> None:
    bob_id = store.add_token("bob", "b" * 64)
    store.add_token("old", "o" * 64, expires_at=1.0)
    job, _ = store.create_job("bob", JobSpec(), owner_id=bob_id)
    who, got = store.identity_and_job("b" * 64, job.id)
    assert who == store.token_identity("b" * 64) and who.owner_id == bob_id and not who.is_admin
    assert got is store.get(job.id)  # the same snapshot as a plain read of the row
    assert store.identity_and_job("b" * 64, "no-such-job") == (who, None)
    assert store.identity_and_job("x" * 64, job.id) == (None, None)  # no such token: not even the job
    assert store.identity_and_job("o" * 64, job.id) == (None, None)  # expired
    store.delete_token("bob")
    assert store.identity_and_job("b" * 64, job.id) == (None, None)  # revoked: at once


def test_delete_only_terminal(store: Store) -> None:
    job, _ = store.create_job("alice", JobSpec())
    assert not store.delete(job.id)
    store.transition(job.id, JobState.CANCELLED)
    assert store.delete(job.id) and store.get(job.id) is None


def test_tokens(store: Store) -> None:
    assert not store.has_admin_token()
    store.add_token("admin", "h" * 64, is_admin=True)
    store.add_token("bob", "b" * 64)
    assert store.has_admin_token()
    assert store.token_owner("b" * 64) == ("bob", False)
    assert store.token_owner("x" * 64) is None
    with pytest.raises(TokenNameTaken):
        store.add_token("bob", "c" * 64)


def test_schema_survives_reopen(database_url: str) -> None:
    s = Store(database_url)
    s.create_schema()
    job, _ = s.create_job("alice", JobSpec(seed=7, exports=[]))
    s.close()
    s2 = Store(database_url)
    s2.create_schema()  # idempotent on an existing file
    assert s2.get(job.id).spec == JobSpec(seed=7, exports=[])
    s2.close()


def test_search_progress_counts_trials_and_picks_the_best() -> None:
    from service.api.views import search_progress
    from trainer.contract import TrialRow

    search = SearchSpec.model_validate(
        {
            "space": {"optim.lr": {"grid": [0.1, 0.01, 0.001]}, "optim.momentum": {"uniform": [0.8, 0.95]}},
            "num_samples": 2,
            "mode": "min",
            "metric": "val_loss",
        }
    )
    trials = [
        {"trial_id": "a", "state": "succeeded", "best_metric": 1.5},
        {
            "trial_id": "b",
            "state": "stopped_early",
            "best_metric": 1.2,
            "stopped_early": True,
            "config": {"optim.lr": 0.01},
        },
        {"trial_id": "c", "state": "failed", "best_metric": 0.1},
        {"trial_id": "d", "state": "running", "best_metric": None},
    ]
    trials = [TrialRow.model_validate(t) for t in trials]
    p = search_progress(search, trials)
    assert p.model_dump() == {
        "trials_total": 6,
        "trials_finished": 3,
        "trials_running": 1,
        "stopped_early": 1,
        "best_trial": "b",
        "best_metric": 1.2,
        "best_config": {"optim.lr": 0.01},
        "metric": "val_loss",
    }
    # once the search was cancelled no trial is left running
    from service.engine.jobdir import settle_trials

    settled = settle_trials(trials, "CANCELLED")
    assert [str(t.state) for t in settled] == ["succeeded", "stopped_early", "failed", "cancelled"]
    assert search_progress(search, settled).trials_running == 0
    assert settle_trials(trials, "RUNNING") == trials


def test_transitions_are_atomic_across_connections(database_url: str) -> None:
    """No Python lock is involved: separate Store objects (separate engines and connections, as in separate
    replicas) race the same compare-and-set; the database lets exactly one win."""
    import threading

    stores = [Store(database_url) for _ in range(6)]
    stores[0].create_schema()
    try:
        for _ in range(3):
            job, _ = stores[0].create_job("alice", JobSpec())
            wins: list[int] = []
            losses: list[int] = []
            barrier = threading.Barrier(len(stores))

            def race(
                i: int,
                job_id: str = job.id,
                barrier: threading.Barrier = barrier,
                wins: list[int] = wins,
                losses: list[int] = losses,
            ) -> None:
                barrier.wait()
                try:
                    stores[i].transition(
                        job_id,
                        JobState.STARTING,
                        expect={JobState.QUEUED},
                        ray_submission_id=f"{job_id}-{i}",
                        attempts=1,
                    )
                    wins.append(i)
                except InvalidTransition:
                    losses.append(i)

            threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(wins) == 1 and len(losses) == len(stores) - 1, (wins, losses)
            assert stores[0].get(job.id).ray_submission_id == f"{job.id}-{wins[0]}"
        # The same for idempotency keys: concurrent submissions with one key make one job.
        made: list[str] = []
        barrier = threading.Barrier(len(stores))

        def submit(i: int) -> None:
            barrier.wait()
            made.append(stores[i].create_job("bob", JobSpec(seed=1), "same-key", "h")[0].id)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(made) == len(stores) and len(set(made)) == 1
    finally:
        for s in stores:
            s.close()


def test_counts_for_metrics(store: Store) -> None:
    a = store.create_job("alice", JobSpec())[0]
    store.create_job("alice", JobSpec())
    store.create_job("bob", JobSpec())
    store.transition(a.id, JobState.CANCELLED)
    counts = store.counts_by_state()
    assert counts[JobState.QUEUED] == 2 and counts[JobState.CANCELLED] == 1 and counts[JobState.RUNNING] == 0
    assert store.queued_by_owner() == {"alice": 1, "bob": 1}


def test_unsupported_database_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="postgresql\\+psycopg"):
        Store("mysql://x@localhost/db")


def test_parse_stored_spec_keeps_what_still_validates() -> None:
    from service.engine.store import parse_stored_spec

    spec, error = parse_stored_spec(JobSpec(seed=4).model_dump_json())
    assert spec == JobSpec(seed=4) and error is None
    # An older version's spec: an unknown field, an out-of-range value, a cross-field conflict.
    spec, error = parse_stored_spec(
        {"gone": 1, "optim": {"epochs": 0, "lr": 0.2}, "model": {"widths": [8, 16], "blocks": [1]}, "seed": 5}
    )
    assert error is not None and "gone" in error and "optim.epochs" in error
    assert spec.seed == 5 and spec.optim.lr == 0.2 and spec.optim.epochs == JobSpec().optim.epochs
    assert len(spec.model.widths) == len(spec.model.blocks)
    spec, error = parse_stored_spec("not json")
    assert spec == JobSpec() and error is not None and "every field" in error
