"""Screenshots of TensorBoard showing `make demo`'s logs, taken with headless Chromium.

Starts a real TensorBoard server on 127.0.0.1 (a free port), waits until it serves the
demo's runs, then takes one screenshot per view with ``chromium --headless`` into
``docs/``: the Images tab (gradient-flow heatmaps and profiles), the Text tab (findings
and layers), the Custom Scalars tab (the "gradguard" charts) and the Scalars tab. It also
saves each run's newest gradient-flow pictures at full size (``flow_<run>_<picture>.png``),
as TensorBoard serves them.

Run after ``make demo`` (``apt-get install chromium`` on Debian/Ubuntu)::

    .venv/bin/python docs/screenshots.py                 # runs/demo -> docs/*.png
    .venv/bin/python docs/screenshots.py --logdir runs/other --out /tmp/shots
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

#: view name -> (TensorBoard URL fragment, window size, extra query)
VIEWS = {
    "tensorboard_images": ("#images", (1600, 900), ""),
    "tensorboard_text": ("#text", (1600, 1300), ""),
    "tensorboard_custom_scalars": ("#custom_scalars", (1600, 820), ""),
    "tensorboard_scalars": ("#scalars", (1600, 1300), ""),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("error: no Chromium found; install it (Debian/Ubuntu: apt-get install chromium)")


def _wait_for_runs(base: str, timeout: float = 90.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/data/plugin/images/tags", timeout=5) as r:
                tags = json.loads(r.read())
            runs = [run for run, t in tags.items() if any(k.startswith("grad_flow") for k in t)]
            if runs:
                return sorted(runs)
        except OSError:
            pass
        time.sleep(1.0)
    sys.exit(f"error: TensorBoard at {base} served no gradient-flow image within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", default="runs/demo", help="TensorBoard logs (default: %(default)s)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="where PNGs go")
    parser.add_argument("--budget", type=int, default=20000, help="Chromium's virtual time budget in ms")
    args = parser.parse_args()
    if not os.path.isdir(args.logdir):
        sys.exit(f"error: {args.logdir} does not exist; run `make demo` first")
    chromium = _browser()
    port = _free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--host", "127.0.0.1"),
            *("--port", str(port), "--load_fast", "false"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        runs = _wait_for_runs(base)
        print(f"TensorBoard at {base} serves {', '.join(runs)}")
        os.makedirs(args.out, exist_ok=True)
        for name, (fragment, (width, height), query) in VIEWS.items():
            path = os.path.join(os.path.abspath(args.out), f"{name}.png")
            subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    f"--screenshot={path}",
                    f"--window-size={width},{height}",
                    f"--virtual-time-budget={args.budget}",
                    f"{base}/?darkMode=false{query}{fragment}",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=180,
            )
            print(f"wrote {path}")
        for run in runs:
            for picture in ("heatmap", "profile"):
                query = urllib.parse.urlencode({"tag": f"grad_flow/{picture}", "run": run})
                with urllib.request.urlopen(f"{base}/data/plugin/images/images?{query}", timeout=10) as r:
                    newest = json.loads(r.read())[-1]
                with urllib.request.urlopen(f"{base}/data/plugin/images/individualImage?{newest['query']}") as r:
                    png = r.read()
                path = os.path.join(args.out, f"flow_{run.split('/')[0]}_{picture}.png")
                with open(path, "wb") as f:
                    f.write(png)
                print(f"wrote {path}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
