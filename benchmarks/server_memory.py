"""The server's memory under requests of huge pictures: peak and settled RSS, and the time taken.

Run: .venv/bin/python -m benchmarks.server_memory [--side 8000] [--clients 3] [--images 8] [--json PATH]

`qwenvl serve` (the bundled demo model, fp32, CPU) runs in a process of its own. Each of
`--clients` concurrent requests carries `--images` palette PNGs of side x side pixels (64
megapixels at the default side: a few coloured bands each, so a request is well under a megabyte)
as data URLs and asks for one token. The server's RSS is sampled every 10 ms from /proc (its peak
also reset through /proc/PID/clear_refs where the kernel allows, and read from VmHWM). Two
settings are measured in the same run, each in a fresh server:

- `reduced`: the server's default, pictures of more than `--max-decoded-pixels` decoded at a
  reduced size;
- `whole`: `--max-decoded-pixels` at the largest picture's size, every picture decoded whole.

The requests are sent twice (two bursts). Figures: idle RSS (after a warm-up request of as many
small pictures), peak RSS during the bursts and its rise over idle, RSS two seconds after each
burst, and each burst's wall time; `peak_rise_whole_over_reduced` and `time_whole_over_reduced`
(the quicker bursts') are the ratios.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_json_option, json_path, markdown_table, save_record  # noqa: E402

RESULT_NAME = "server_memory.json"
MIB = 2**20


def banded_png(side: int, seed: int) -> bytes:
    """A palette PNG of side x side pixels in a few horizontal bands (compresses ~1000:1)."""
    from PIL import Image, ImageDraw

    image = Image.new("P", (side, side), 0)
    image.putpalette([(seed * 40 + 17 * i) % 256 for i in range(768)])
    draw = ImageDraw.Draw(image)
    for band in range(8):
        top = band * side // 8
        draw.rectangle((0, top, side, top + side // 8), fill=(band * 31 + seed) % 256)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def request_body(pngs: list[bytes]) -> dict:
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(p).decode()}}
        for p in pngs
    ]
    parts.append({"type": "text", "text": "How many pictures are there?"})
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 1, "temperature": 0}


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(setting: str, max_decoded_pixels: int, bodies: list[dict]) -> dict[str, Any]:
    import httpx

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "qwenvl",
        "serve",
        "--fp32",
        "--port",
        str(port),
        "--max-images",
        str(max(len(b["messages"][0]["content"]) for b in bodies)),
        "--max-decoded-pixels",
        str(max_decoded_pixels),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(f"{base}/health").raise_for_status()
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {server.stderr.read()}") from None
                time.sleep(0.2)
        # the model's first run over as many small pictures takes what it keeps for good
        images = len(bodies[0]["messages"][0]["content"]) - 1
        warm = request_body([banded_png(64, seed) for seed in range(images)])
        httpx.post(f"{base}/v1/chat/completions", json=warm, timeout=300).raise_for_status()
        idle = rss_bytes(server.pid)
        bursts = [burst(server.pid, base, bodies, setting) for _ in range(2)]
    finally:
        server.terminate()
        server.wait(timeout=60)
    peak = max(b["peak"] for b in bursts)
    return {
        "max_decoded_pixels": max_decoded_pixels,
        "idle_rss_mib": idle / MIB,
        "peak_rss_mib": peak / MIB,
        "peak_rise_mib": (peak - idle) / MIB,
        "rss_after_mib": [b["after"] / MIB for b in bursts],
        "seconds": [b["seconds"] for b in bursts],
        "peak_from_vmhwm": all(b["peak_from_vmhwm"] for b in bursts),
    }


def burst(pid: int, base: str, bodies: list[dict], setting: str) -> dict[str, Any]:
    """The requests at once: the peak RSS while they run, the RSS two seconds after, the time."""
    import httpx

    hwm_reset = reset_peak(pid)
    peak, done = [rss_bytes(pid)], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(rss_bytes(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(
            pool.map(lambda b: httpx.post(f"{base}/v1/chat/completions", json=b, timeout=600), bodies)
        )
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    statuses = [r.status_code for r in responses]
    if statuses != [200] * len(bodies):
        raise RuntimeError(f"{setting}: statuses {statuses}: {responses[0].text[:300]}")
    peak_rss = max(max(peak), rss_bytes(pid, "VmHWM") if hwm_reset else 0)
    time.sleep(2)
    return {"peak": peak_rss, "after": rss_bytes(pid), "seconds": elapsed, "peak_from_vmhwm": hwm_reset}


def main() -> None:
    from qwenvl.images import SERVER_DECODED_PIXELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=8000, help="pictures are side x side pixels")
    parser.add_argument("--images", type=int, default=8, help="pictures per request")
    parser.add_argument("--clients", type=int, default=3, help="concurrent requests")
    add_json_option(parser, RESULT_NAME)
    args = parser.parse_args()

    pngs = [banded_png(args.side, seed) for seed in range(args.images * args.clients)]
    bodies = [request_body(pngs[i * args.images : (i + 1) * args.images]) for i in range(args.clients)]
    body_bytes = [len(str(b)) for b in bodies]
    settings = {"reduced": SERVER_DECODED_PIXELS, "whole": args.side * args.side}
    results: dict[str, Any] = {
        "side": args.side,
        "images_per_request": args.images,
        "clients": args.clients,
        "request_kb": [round(n / 1000) for n in body_bytes],
        "cpu_count": os.cpu_count(),
    }
    for name, pixels in settings.items():
        results[name] = measure(name, pixels, bodies)
    results["peak_rise_whole_over_reduced"] = (
        results["whole"]["peak_rise_mib"] / results["reduced"]["peak_rise_mib"]
    )
    results["time_whole_over_reduced"] = min(results["whole"]["seconds"]) / min(results["reduced"]["seconds"])

    headers = [
        "setting",
        "decoded pixels at most",
        "idle MiB",
        "peak MiB",
        "rise MiB",
        "after each burst MiB",
        "seconds of each burst",
    ]
    rows = [
        [
            name,
            f"{r['max_decoded_pixels']:,}",
            r["idle_rss_mib"],
            r["peak_rss_mib"],
            r["peak_rise_mib"],
            " / ".join(f"{v:,.0f}" for v in r["rss_after_mib"]),
            " / ".join(f"{v:.1f}" for v in r["seconds"]),
        ]
        for name, r in ((n, results[n]) for n in settings)
    ]
    print(
        f"{args.clients} concurrent requests of {args.images} PNGs of {args.side}x{args.side} "
        f"({', '.join(f'{k} kB' for k in results['request_kb'])})"
    )
    print(markdown_table(headers, rows))
    print(
        f"peak rise whole/reduced: {results['peak_rise_whole_over_reduced']:.2f}x; "
        f"time whole/reduced: {results['time_whole_over_reduced']:.2f}x"
    )
    path = json_path(args, RESULT_NAME)
    save_record(path, "server_memory", results)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
