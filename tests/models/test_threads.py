"""The CPU thread count chosen when `train.num_threads` is not set."""

import os

import torch

from sapo_lite.models.threads import apply_threads, auto_threads


def test_small_or_loaded_machines_get_fewer_threads():
    assert auto_threads(cores=2, physical=2, load=0.0)[0] == 1
    assert auto_threads(cores=1, physical=1, load=0.0)[0] == 1
    assert auto_threads(cores=16, physical=8, load=0.5)[0] == 8  # quiet: one thread per physical core
    assert auto_threads(cores=16, physical=8, load=13.0)[0] == 3  # busy: what the load leaves idle
    assert auto_threads(cores=8, physical=4, load=30.0)[0] == 1


def test_an_explicit_count_wins_and_the_choice_is_reported():
    before = torch.get_num_threads()
    try:
        assert apply_threads(1, torch.device("cpu")) == "CPU threads: 1 (train.num_threads)"
        line = apply_threads(None, torch.device("cpu"))
        assert line.startswith(f"CPU threads: {torch.get_num_threads()} (auto: ")
    finally:
        torch.set_num_threads(before)


def test_generation_takes_the_cores_others_left_idle_and_never_fewer_than_training():
    from sapo_lite.models.threads import decode_thread_count

    assert decode_thread_count(train_threads=1, cores=2, others_busy=0.0) == 2
    assert decode_thread_count(train_threads=1, cores=2, others_busy=0.2) == 2  # a little background work
    assert decode_thread_count(train_threads=1, cores=2, others_busy=0.5) == 1
    assert decode_thread_count(train_threads=1, cores=2, others_busy=3.0) == 1
    assert decode_thread_count(train_threads=4, cores=8, others_busy=2.0) == 6
    assert decode_thread_count(train_threads=4, cores=8, others_busy=7.0) == 4


def test_decode_threads_follow_what_the_machine_did_and_are_set_back(monkeypatch):
    from sapo_lite.models import threads

    clock = {"wall": 100.0, "busy": 50.0, "own": 10.0}
    monkeypatch.setattr(threads, "cpu_times", lambda: (clock["wall"], clock["busy"], clock["own"]))
    monkeypatch.setattr(threads, "physical_cores", lambda: 2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chooser = threads.DecodeThreads(1)
        clock.update(wall=110.0, busy=63.0, own=23.0)  # 10 s: this process busy 1.3 cores, nobody else
        with chooser:
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        clock.update(wall=120.0, busy=86.0, own=36.0)  # another job took a whole core
        with chooser:
            assert torch.get_num_threads() == 1
        clock.update(wall=120.5, busy=86.5, own=36.5)  # under a second since: the last choice stands
        assert chooser.choose() == 1
    finally:
        torch.set_num_threads(before)


def test_without_the_machine_figures_generation_keeps_trainings_count(monkeypatch):
    from sapo_lite.models import threads

    monkeypatch.setattr(threads, "cpu_times", lambda: None)
    assert threads.DecodeThreads(1).choose() == 1


def test_a_container_quota_lowers_the_usable_cores(monkeypatch):
    from sapo_lite.models import threads

    monkeypatch.setattr(threads, "_cgroup_cpu_quota", lambda: 1.5)
    assert threads.usable_cores() == min(2, len(os.sched_getaffinity(0)))
    monkeypatch.setattr(threads, "_cgroup_cpu_quota", lambda: 0.5)
    assert threads.usable_cores() == 1
