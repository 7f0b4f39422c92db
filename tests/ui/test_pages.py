"""The dashboard's pages in a real browser, on a finished tiny run: the curves, a pair, the chat answers."""

from __future__ import annotations

import json

import pytest

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # no selenium: the `browser` fixture skips these tests with the install line (fails under CI)
    By = WebDriverWait = None

pytestmark = pytest.mark.slow


def wait_for(driver, script: str, timeout: float = 60):
    """The value of a JavaScript expression once it is truthy."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: d.execute_script("return " + script))


def test_runs_page_draws_every_step_of_a_finished_run_and_then_stops_asking(browser, dashboard, runs_dir, shots):
    steps = [json.loads(line)["step"] for line in (runs_dir / "done" / "metrics.jsonl").read_text().splitlines()]
    browser.get(dashboard.url + "/")
    row = wait_for(browser, "document.querySelector('#runs tr[data-run=done]')")
    assert row.find_element(By.CSS_SELECTOR, ".state").text == "finished"
    assert row.find_element(By.CSS_SELECTOR, ".step").text == f"{steps[-1]} / {steps[-1]}"
    # the loss curve: one point a step of metrics.jsonl, at those steps
    wait_for(browser, "window.sapoRuns.plot && window.sapoRuns.plot.data[0].length > 0")
    drawn_steps = browser.execute_script("return window.sapoRuns.plot.data[0]")
    losses = browser.execute_script("return window.sapoRuns.plot.data[1].filter(v => v !== null).length")
    assert drawn_steps == steps and losses == len(steps)
    assert browser.find_element(By.CSS_SELECTOR, "#chart .u-title").text == "loss"
    # nothing trains: the page sends no request after drawing (an idle tab on a finished run costs nothing)
    wait_for(browser, "document.body.dataset.polling === 'no'")
    sent = browser.execute_script("return performance.getEntriesByType('resource').length")
    browser.execute_script("return new Promise(done => setTimeout(done, 4 * SAPO.pollMs))")
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == sent
    shots(browser, "ui-runs")


def test_pairs_page_highlights_the_rewritten_segment_at_its_cut_point(browser, dashboard, runs_dir, shots):
    from sapo_lite.data.examples import install_chat_template, stop_token_ids
    from sapo_lite.models.roles import load_tokenizer
    from sapo_lite.run.layout import RunDir
    from sapo_lite.tools.buffer_view import newest_pairs, open_buffer_readonly, pair_text

    run = runs_dir / "done"
    cfg = RunDir(run).read_config()
    tokenizer = load_tokenizer(RunDir(run).base_model_name(cfg))
    install_chat_template(tokenizer, cfg.data.chat_template)
    db = open_buffer_readonly(run)
    newest = newest_pairs(db, 1)[0]
    db.close()
    expected = pair_text(newest, lambda ids: tokenizer.decode([int(i) for i in ids]), stop_token_ids(tokenizer))
    assert expected.chosen_segment != expected.rejected_segment, "the newest pair must hold a real rewrite"

    browser.get(dashboard.url + "/pairs?run=done")
    card = wait_for(browser, f"document.querySelector('.pair[data-pair=\"{newest.pair_id}\"]')")
    rejected = card.find_element(By.CSS_SELECTOR, ".response.rejected")
    chosen = card.find_element(By.CSS_SELECTOR, ".response.chosen")
    segment = rejected.find_element(By.CSS_SELECTOR, "mark.segment").get_attribute("textContent")
    assert segment == expected.rejected_segment
    assert chosen.find_element(By.CSS_SELECTOR, "mark.segment").get_attribute("textContent") == expected.chosen_segment
    # highlighted where it was cut in: after the shared prefix, before the kept tail
    text = rejected.get_attribute("textContent")
    kept = expected.tail if expected.kept_tail else ""
    assert text == "rejected " + expected.prefix + expected.rejected_segment + kept
    assert f"step {newest.step_added}" in card.find_element(By.CSS_SELECTOR, "h3").text
    assert expected.ending in card.find_element(By.CSS_SELECTOR, ".ending").text
    # a step range with no pairs in it empties the list
    browser.execute_script("document.querySelector('#first_step').value = 999;"
                           "document.querySelector('#first_step').dispatchEvent(new Event('change'))")
    wait_for(browser, "document.querySelectorAll('.pair').length === 0")
    browser.execute_script("document.querySelector('#first_step').value = '';"
                           "document.querySelector('#first_step').dispatchEvent(new Event('change'))")
    wait_for(browser, "document.querySelectorAll('.pair').length > 0")
    shots(browser, "ui-pairs")


def test_chat_answers_as_each_role_the_way_generate_does(browser, dashboard, runs_dir, shots):
    from sapo_lite.models.generation import generate_answers
    from sapo_lite.models.roles import acting_as
    from sapo_lite.tools.open_run import open_run

    prompt = "reverse : 8 0 0 8 6"
    browser.get(dashboard.url + "/chat?run=done")
    wait_for(browser, "document.querySelector('#target option')")
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.execute_script("document.querySelector('#max_new_tokens').value = 12")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, "document.querySelectorAll('.answer.done').length === 3", timeout=120)
    shown = {a.get_attribute("data-role"): a.find_element(By.TAG_NAME, "p").text
             for a in browser.find_elements(By.CSS_SELECTOR, ".answer")}
    assert list(shown) == ["base", "policy", "ema"]

    loaded = open_run(runs_dir / "done", ["base", "policy", "ema"])  # what `sapo-lite generate` answers
    for role, text in shown.items():
        with acting_as(loaded.model, role):
            (answer,) = generate_answers(loaded.model, loaded.tokenizer, [loaded.prompt_ids(prompt)], 12,
                                         loaded.stop_ids)
        assert text == (answer or "(an empty answer: the first token was a stop token)"), role
    assert any(shown.values())
    shots(browser, "ui-chat")

    # streamed: the base's answer arrives token by token, each message the answer so far
    from test_safety import status_of

    code, body = status_of(dashboard.url + "/api/chat",
                           {"target": "done", "prompt": prompt, "max_new_tokens": 12, "roles": ["base"]})
    messages = [json.loads(line) for line in body.splitlines()]
    texts = [m["text"] for m in messages if "text" in m]
    assert code == 200 and messages[-1] == {"role": "base", "done": True}
    assert len(texts) > 3 and texts[-1] == shown["base"]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))


def test_pairs_filters_by_identical_cut_off_and_origin(dashboard, runs_dir):
    """Each filter keeps exactly the pairs it names; pairs of two origins (pairs read from data beside the EMA's
    rewrites) add the origin filter, and a buffer of one origin offers none."""
    import shutil
    import sqlite3

    from test_safety import status_of

    from sapo_lite.sapo.augment import CUT_OFF

    def shown(run: str, **query) -> dict:
        params = "&".join(f"{key}={value}" for key, value in {"run": run, **query}.items())
        code, body = status_of(f"{dashboard.url}/api/pairs?{params}")
        assert code == 200, body
        return json.loads(body)

    every = shown("done")
    assert every["origins"] is None and every["pairs"]
    for flag, wanted in (("identical", lambda p: p["identical"]), ("cut_off", lambda p: p["ending"] == CUT_OFF)):
        only = shown("done", **{flag: "only"})["pairs"]
        hidden = shown("done", **{flag: "hide"})["pairs"]
        match = [p for p in every["pairs"] if wanted(p)]
        assert [p["id"] for p in only] == [p["id"] for p in match]
        assert len(only) + len(hidden) == len(every["pairs"])

    shutil.copytree(runs_dir / "done", runs_dir / "with-origin")
    # the validation split's pairs are stored like the buffer's: a copy of it stands in for them
    shutil.copy(runs_dir / "done" / "buffer.sqlite", runs_dir / "with-origin" / "validation.sqlite")
    db = sqlite3.connect(runs_dir / "with-origin" / "buffer.sqlite")
    db.execute("UPDATE pairs SET origin = CASE WHEN id % 3 = 0 THEN 'data' ELSE 'ema' END")
    db.commit()
    db.close()
    from_data = shown("with-origin", origin="data")
    assert from_data["origins"] == ["data", "ema"]
    assert from_data["pairs"] and all(p["id"] % 3 == 0 and p["origin"] == "data" for p in from_data["pairs"])
    validation = shown("with-origin", source="validation")
    assert validation["origins"] is None and [p["id"] for p in validation["pairs"]] == [p["id"] for p in every["pairs"]]
    code, body = status_of(f"{dashboard.url}/api/pairs?run=done&source=validation")
    assert code == 404 and "no validation pairs" in body
