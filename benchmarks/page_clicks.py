"""How long the playground takes to answer a click on a character: from the click to its candidates, its lens
(every depth), its attention (every layer and head) and the heads' names all on screen, in headless Chromium
against `charlm serve` on one checkpoint. Target: within 100 ms for the default model.

    python benchmarks/page_clicks.py --ckpt_path last [--clicks 20]

A 500-character generation is made first; the clicks go to characters spread over it (the heads' names are asked
for once per text: the first click pays for them).
"""

import argparse
import shutil
import statistics
import subprocess
import sys

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
# clicks a character and waits, in the page, for every panel: the time a person waits, without the driver's own
CLICK = """i => new Promise((resolve) => {
  const start = performance.now();
  document.querySelectorAll('#output .tok')[i].click();
  const answered = () => state.picked === i && state.attention?.pos === i
    && document.querySelectorAll('#lens .row').length > 0 && document.querySelector('#heads .role')?.textContent;
  const poll = () => answered() ? resolve(performance.now() - start) : requestAnimationFrame(poll);
  poll();
})"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default="last")
    parser.add_argument("--clicks", type=int, default=20)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("no Chromium here: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    command = [sys.executable, "-m", "charlm", "serve", "--ckpt_path", args.ckpt_path, "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = next(line for line in server.stdout if "playground at" in line).split()[3]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#run option", state="attached")
            page.fill("#max_new_tokens", "500")
            page.click("#generate")
            page.wait_for_selector("#output[data-state=done]", timeout=120_000)
            seconds = []
            for n in range(args.clicks):
                i = 7 + n * 480 // args.clicks  # a generated character (the prompt is 7 tokens: ROMEO:\n)
                seconds.append(page.evaluate(CLICK, i) / 1000)
            browser.close()
    finally:
        server.terminate()
        server.wait()
    ms = [1000 * s for s in seconds]
    print(f"first click {ms[0]:.0f} ms (the heads' names measured); then median {statistics.median(ms[1:]):.0f} ms, "
          f"slowest {max(ms[1:]):.0f} ms over {len(ms) - 1} clicks")  # fmt: skip


if __name__ == "__main__":
    main()
