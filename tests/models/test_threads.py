"""The CPU thread count chosen when `train.num_threads` is not set."""

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
