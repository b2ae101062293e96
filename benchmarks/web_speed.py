"""Characters per second of the exported page (`charlm export --web`): the model running in a headless Chromium
tab, served as plain files, against `charlm generate` on the same checkpoint and settings.

The page's rate is the characters over the time from the click on Generate to the last character shown (the
page's own drawing included); generate's from its first character to its last, as serve_speed.py measures it.
Target: at least 200 characters a second in the page for the default model.

    python benchmarks/web_speed.py --ckpt_path last [--max_new_tokens 2000] [--repeats 3]
"""

import argparse
import functools
import http.server
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from serve_speed import cli

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default="last")
    parser.add_argument("--max_new_tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("no Chromium here: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    folder = Path(tempfile.mkdtemp()) / "site"
    export = [sys.executable, "-m", "charlm", "export", "--ckpt_path", args.ckpt_path, "--web", "true"]
    subprocess.run([*export, "--to", str(folder)], check=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietFiles, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page_rates, cli_rates = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_selector("#run option", state="attached")
        page.fill("#prompt", "ROMEO:")
        page.fill("#max_new_tokens", str(args.max_new_tokens))
        for i in range(args.repeats):
            start = time.perf_counter()
            page.click("#generate")
            page.wait_for_selector("#output[data-state=done]", timeout=600_000)
            page_rates.append(args.max_new_tokens / (time.perf_counter() - start))
            cli_rates.append(cli(args.ckpt_path, args.max_new_tokens)[1])
            print(f"round {i + 1}: page {page_rates[-1]:,.0f} chars/s, generate {cli_rates[-1]:,.0f} chars/s")
        browser.close()
    server.shutdown()
    shutil.rmtree(folder.parent)
    page_rate, cli_rate = statistics.median(page_rates), statistics.median(cli_rates)
    print(f"median: the page {page_rate:,.0f} chars/s, charlm generate {cli_rate:,.0f} chars/s")


if __name__ == "__main__":
    main()
