"""A run started from the dashboard's form, watched while it trains, stopped like Ctrl-C, and resumed to the end:
in a real browser, with the tiny preset, one thread and a few steps."""

from __future__ import annotations

import json

import pytest

try:
    from selenium.webdriver.common.by import By
except ImportError:  # no selenium: the `browser` fixture skips these tests with the install line (fails under CI)
    By = None
from test_pages import wait_for

from sapo_lite.config.sources import load_config
from sapo_lite.errors import ConfigError
from sapo_lite.run.layout import RunDir, checkpoint_step

pytestmark = pytest.mark.slow
# few examples and small steps: the test's cost is the two processes' start, not training
FORM = {"train.max_steps": "300", "train.num_threads": "1", "data.eval_path": "null", "train.warmup_steps": "2",
        "data.max_examples": "64", "sapo.gen_per_step": "8", "sapo.gen_batch_size": "8", "train.micro_batch": "8"}


def set_field(driver, key: str, value: str) -> None:
    driver.execute_script("const input = document.querySelector(`[name='${arguments[0]}']`);"
                          "input.value = arguments[1]; input.dispatchEvent(new Event('input'))", key, value)


def control_state(driver, wanted: str, timeout: float) -> None:
    wait_for(driver, f"document.querySelector('#control-state').dataset.state === '{wanted}'", timeout)


def test_a_run_started_from_the_form_trains_live_stops_with_a_checkpoint_and_resumes(browser, dashboard, runs_dir,
                                                                                      shots):
    browser.get(dashboard.url + "/launch")
    wait_for(browser, "document.querySelector(\"[name='train.max_steps']\")")
    # a wrong value: the error `sapo-lite train` gives, and nothing starts
    with pytest.raises(ConfigError) as cli_error:
        load_config("tiny", None, ["train.lr=-1"])
    set_field(browser, "train.lr", "-1")
    browser.find_element(By.ID, "start").click()
    error = wait_for(browser, "document.querySelector('#launch-error').textContent")
    assert cli_error.value.message in error
    assert not (runs_dir / "live").exists()
    shots(browser, "ui-launch")

    set_field(browser, "train.lr", browser.execute_script(
        "return document.querySelector(\"[name='train.lr']\").dataset.preset"))
    for key, value in FORM.items():
        set_field(browser, key, value)
    browser.execute_script("document.querySelector('#run-name').value = 'live'")
    browser.find_element(By.ID, "start").click()

    # the Runs page: the run trains, and its curve grows without a reload
    browser.get(dashboard.url + "/?run=live")
    wait_for(browser, "document.querySelector('#runs tr[data-run=live] .state.training')", timeout=180)
    first = wait_for(browser, "(window.sapoRuns.records.live || []).length", timeout=120)
    grown = wait_for(browser, f"window.sapoRuns.records.live.length > {first} && window.sapoRuns.records.live.length",
                     timeout=120)
    drawn = browser.execute_script("return window.sapoRuns.plot.data[0]")
    assert drawn == list(range(1, grown + 1))  # every step, once, in order
    assert browser.execute_script("return document.body.dataset.polling") == "yes"

    # stop: Ctrl-C, the step finishes and a checkpoint is written; the page offers the resume command
    browser.get(dashboard.url + "/launch")
    wait_for(browser, "document.querySelector('#control-run option[value=live]')")
    browser.execute_script("const s = document.querySelector('#control-run'); s.value = 'live';"
                           "s.dispatchEvent(new Event('change'))")
    control_state(browser, "training", 30)
    browser.find_element(By.ID, "stop").click()
    control_state(browser, "stopped", 120)
    run = RunDir(runs_dir / "live")
    stopped_at = checkpoint_step(run.completed_checkpoints()[-1])
    steps = [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()]
    assert steps[-1] == stopped_at < 300
    assert f"sapo-lite train --resume {run.path}" in browser.find_element(By.ID, "control-state").text
    browser.execute_script("document.querySelector('#control-run').scrollIntoView()")
    shots(browser, "ui-control")

    # resume to two more steps: it finishes
    browser.find_element(By.ID, "resume-overrides").send_keys(f"train.max_steps={stopped_at + 2}")
    browser.find_element(By.ID, "resume").click()
    control_state(browser, "finished", 240)
    summary = json.loads(run.summary.read_text())
    assert summary["steps"] == stopped_at + 2
    steps = [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()]
    assert steps == list(range(1, stopped_at + 3))
