#!/usr/bin/env python3
"""Codec auto against --codec none on unshaped loopback: wall time AND CPU seconds.

Interleaved runs of `pagewire demo --json` (one process) and of `pagewire send`/`pagewire
recv --out /dev/null` (two processes, receiver on fresh memory), each with the default codec
(auto) and with `--codec none`; optionally a second binary's auto ("before") in the same
rotation. Prints medians and quartiles of the migration's seconds (the sender's `seconds`),
the sender's and receiver's channel-thread CPU seconds (`cpu_seconds` in the JSON) and the
pages auto compressed. CPU seconds are far less sensitive to a loaded machine than wall time.

  python3 benches/scripts/auto_overhead.py --runs 25 --image guest.img \
      --bin target/release/pagewire [--before /path/to/older/pagewire]

The image: any file, e.g. the 256 MiB realistic mix the link benchmark writes
(target/release/link leaves it in $TMPDIR/pagewire-link-PID/guest.img).
"""
import argparse
import json
import socket
import statistics
import subprocess
import sys
import time


def demo(binary, extra):
    p = subprocess.run([binary, "demo", "--json"] + extra, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"demo failed: {p.stderr[-500:]}")
    j = json.loads(p.stdout)
    return dict(seconds=j["sender"]["seconds"], snd_cpu=j["sender"]["cpu_seconds"],
                rcv_cpu=j["receiver"]["cpu_seconds"], compressed=j["sender"]["pages"]["compressed"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two(binary, extra, image):
    addr = f"127.0.0.1:{free_port()}"
    rp = subprocess.Popen([binary, "recv", "--listen", addr, "--out", "/dev/null", "--json",
                           "--accept-timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(500):
        sp = subprocess.run([binary, "send", "--connect", addr, "--image", image, "--channels", "2",
                             "--json"] + extra, capture_output=True)
        if sp.returncode == 0 or b"refused" not in sp.stderr:
            break
        time.sleep(0.02)
    ro, re_ = rp.communicate(timeout=120)
    if sp.returncode or rp.returncode:
        sys.exit(f"migration failed: {sp.stderr[-300:]} {re_[-300:]}")
    s, r = json.loads(sp.stdout), json.loads(ro)
    return dict(seconds=s["seconds"], snd_cpu=s["cpu_seconds"], rcv_cpu=r["cpu_seconds"],
                compressed=s["pages"]["compressed"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--bin", default="target/release/pagewire")
    ap.add_argument("--before", help="another pagewire binary whose auto joins the rotation")
    ap.add_argument("--image", help="image file for the two-process case (omit to skip it)")
    ap.add_argument("--no-demo", action="store_true", help="skip the one-process case")
    a = ap.parse_args()
    variants = {"auto": (a.bin, []), "none": (a.bin, ["--codec", "none"])}
    if a.before:
        variants = {"auto-before": (a.before, []), **variants}
    names = list(variants)
    cases = [] if a.no_demo else [("demo (one process)", lambda b, e: demo(b, e))]
    if a.image:
        cases.append(("send/recv (two processes)", lambda b, e: two(b, e, a.image)))
    for title, run in cases:
        res = {k: [] for k in names}
        for i in range(a.runs):
            k = i % len(names)
            for v in names[k:] + names[:k]:
                res[v].append(run(*variants[v]))
        print(f"{title}: {a.runs} interleaved runs each")
        med = {}
        for v, rs in res.items():
            print(f"  {v}")
            for key in ["seconds", "snd_cpu", "rcv_cpu", "compressed"]:
                xs = [x[key] for x in rs]
                q1, m, q3 = statistics.quantiles(xs, n=4, method="inclusive")
                med[(v, key)] = m
                print(f"    {key:10s} median {m:.4f}  quartiles {q1:.4f}-{q3:.4f}  "
                      f"min {min(xs):.4f}  max {max(xs):.4f}")
        for v in names:
            if v != "none":
                print(f"  {v} / none: " + ", ".join(
                    f"{key} {med[(v, key)] / med[('none', key)]:.3f} x"
                    for key in ["seconds", "snd_cpu", "rcv_cpu"]))


if __name__ == "__main__":
    main()
