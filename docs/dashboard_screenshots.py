"""Screenshots of the dashboard for the docs, taken in headless Chromium on the real SmolLM2:

    .venv/bin/python docs/dashboard_screenshots.py            # writes docs/images/dashboard*.png

It serves the app on a free local port, analyses the "prose" sample, streams the default text with S = 4,
W = 64, evicts the sinks after 200 tokens and restores them 120 tokens later, then saves the page.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from werkzeug.serving import make_server

import sinkscope
from dashboard import create_app

HERE = Path(__file__).resolve().parent


def _tokens(driver) -> int:
    global _state
    _state = f"{_text(driver, 'stream-status')} | {_text(driver, 'stream-message')}"
    return len(driver.find_elements(By.CSS_SELECTOR, "#stream-text .tok"))


def _text(driver, id_: str) -> str:
    found = driver.find_elements(By.ID, id_)  # empty until Dash has rendered the page
    return found[0].text if found else ""


_state = ""


def _wait(pred, what: str, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(f"the dashboard did not get there in time: {what}; {_state}")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "images"), help="folder for the PNG files")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()

    app = create_app({"smollm2-135m": sinkscope.load_model("smollm2-135m", progress=False)})
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"

    opts = webdriver.ChromeOptions()
    opts.binary_location = args.chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--window-size=1700,1900", "--hide-scrollbars"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts)
    try:
        driver.get(url)
        find = driver.find_element
        _wait(lambda: "layers" in _text(driver, "model-status"), "the model")
        for field, value in (("window", "64"),):
            el = find(By.ID, field)
            el.clear()
            el.send_keys(value + "\n")
        find(By.ID, "analyze").click()
        find(By.ID, "start").click()
        _wait(lambda: "analysed in" in _text(driver, "analysis-status"), "the analysis")
        _wait(lambda: _tokens(driver) >= 200, "200 tokens")
        find(By.CSS_SELECTOR, "#keep-sinks input").click()
        _wait(lambda: _tokens(driver) >= 320, "320 tokens")
        find(By.CSS_SELECTOR, "#keep-sinks input").click()
        _wait(lambda: _tokens(driver) >= 480, "480 tokens")
        find(By.ID, "stop").click()
        time.sleep(2)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out / "dashboard.png"))
        for pane, name in ((0, "dashboard-analysis.png"), (1, "dashboard-stream.png")):
            driver.find_elements(By.CSS_SELECTOR, "section.pane")[pane].screenshot(str(out / name))
        print("wrote", ", ".join(str(out / n) for n in ("dashboard.png", "dashboard-analysis.png",
                                                       "dashboard-stream.png")))
    finally:
        driver.quit()
        app.sinkscope.streams.shutdown()
        server.shutdown()


if __name__ == "__main__":
    main()
