"""The verifier pool: input order, hard timeouts, crashes, memory cap, a dead host.

Standard-library functions stand in for the verifier, so each failure mode is exact.
"""

import time

import pytest

from jaxcov.rewards.pool import TaskResult, VerifierPool


def test_results_keep_input_order_and_errors_are_reported():
    with VerifierPool("builtins:pow", num_workers=2) as pool:
        results = pool.run([(2, 10), (0, -1), (3, 4), (7, 2), (10, 3)], timeout_s=5.0)
    assert results == [TaskResult("ok", 1024), TaskResult("error"), TaskResult("ok", 81),
                       TaskResult("ok", 49), TaskResult("ok", 1000)]


def test_a_hanging_task_is_killed_at_the_bound_and_its_worker_replaced():
    with VerifierPool("builtins:pow", num_workers=2) as pool:
        start = time.monotonic()
        results = pool.run([(9, 9 ** 9), (2, 5), (3, 3)], timeout_s=0.5)  # 9^387420489 hangs
        elapsed = time.monotonic() - start
        assert pool.restarts == 1
        # the replacement worker serves the next batch
        assert pool.run([(9, 9 ** 9), (5, 2)], timeout_s=0.5) == [TaskResult("timeout"),
                                                                   TaskResult("ok", 25)]
        assert pool.restarts == 2
    assert results == [TaskResult("timeout"), TaskResult("ok", 32), TaskResult("ok", 27)]
    assert 0.5 <= elapsed < 3.0


def test_a_crashing_worker_is_an_error_and_is_replaced():
    with VerifierPool("os:_exit", num_workers=1) as pool:
        assert pool.run([(3,), (4,)], timeout_s=5.0) == [TaskResult("error")] * 2
        assert pool.restarts == 2


def test_memory_cap_turns_a_huge_allocation_into_an_error():
    # Uncapped, bytearray(1 GiB) would succeed; under a 512 MiB cap it raises MemoryError.
    with VerifierPool("builtins:bytearray", num_workers=1, memory_mb=512) as pool:
        assert pool.run([(2 ** 30,), (3,)], timeout_s=5.0) == [
            TaskResult("error"), TaskResult("ok", bytearray(3))]


def test_a_dead_host_is_restarted_before_the_next_batch():
    with VerifierPool("builtins:abs", num_workers=1) as pool:
        assert pool.run([(-3,)], timeout_s=5.0) == [TaskResult("ok", 3)]
        pool._host.kill()
        pool._host.wait()
        assert pool.run([(-4,)], timeout_s=5.0) == [TaskResult("ok", 4)]


def test_closed_pool_refuses_work():
    pool = VerifierPool("builtins:abs", num_workers=1)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run([(1,)], timeout_s=1.0)


def test_the_bound_is_cpu_time_with_a_wall_clock_cap():
    with VerifierPool("time:sleep", num_workers=2) as pool:
        start = time.monotonic()
        # Sleeping uses no CPU: 0.5 s of waiting passes a 0.3 s bound, 30 s hits the 10x cap.
        results = pool.run([(0.5,), (30,)], timeout_s=0.3)
        elapsed = time.monotonic() - start
    assert results == [TaskResult("ok", None), TaskResult("timeout")]
    assert 3.0 <= elapsed < 6.0


def test_task_queue_keeps_runs_contiguous_and_steals_the_rest():
    from jaxcov.rewards.pool import _TaskQueue
    queue = _TaskQueue(10, 3)  # runs [0 1 2] [3 4 5] [6 7 8 9]
    taken = {0: [], 1: [], 2: []}
    for worker in [0, 1, 2, 0, 0, 0, 2, 0, 1, 2]:
        taken[worker].append(queue.pop(worker))
    # worker 0 finished its run and stole the back half (8 9) of the longest one; worker 2
    # finished its remaining 7 and stole the last task, 5
    assert taken == {0: [0, 1, 2, 8, 9], 1: [3, 4], 2: [6, 7, 5]}
    assert not queue and queue.pop(1) is None
