#!/usr/bin/env python3
"""Many certificates on one listener: what a start and a reload cost (issue 15).

N certificates (ECDSA P-256, two names each, made once with the openssl CLI into a cache
directory) on one TLS listener. Measures, in this process:

- the control process's read and check of every file (lb.control.tls.TlsKeeper.load), run
  in a thread as the daemon runs it, and how late the event loop got meanwhile (the loop
  answers worker pings and the admin API during a reload);
- a worker's build of every certificate context (lb.tls.server.ListenerTls.load: at start);
- a reload in which one certificate was renewed: the control process reads all again, a
  worker builds one context (the others are kept);
- the bytes the material takes in each worker's config message (limit: 12 MiB).

    .venv/bin/python bench/tls_certs.py --certs 1000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.pki import Pki
from lb import config as config_mod
from lb.control.tls import TlsKeeper, wire_size
from lb.stats import Stats
from lb.tls.server import ListenerTls


def config(leaves: list[tuple[Path, Path]]) -> config_mod.Config:
    certs = ", ".join(f'{{ cert_file = "{c}", key_file = "{k}" }}' for c, k in leaves)
    return config_mod.loads(f"""
[node]
name = "bench"
[[listener]]
name = "https"
bind = "127.0.0.1:1"
pool = "web"
[listener.tls]
certificates = [{certs}]
[[pool]]
name = "web"
backends = [{{ name = "b", address = "127.0.0.1:2" }}]
""")


async def timed_load(keeper: TlsKeeper, cfg: config_mod.Config) -> tuple[float, float, object]:
    """(seconds, the loop's worst lateness in seconds, material)."""
    lags: list[float] = []
    done = False

    async def tick() -> None:
        while not done:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    ticker = asyncio.create_task(tick())
    t0 = time.monotonic()
    material, errors = await asyncio.to_thread(keeper.load, cfg)
    took = time.monotonic() - t0
    done = True
    await ticker
    assert not errors, errors[:3]
    return took, max(lags, default=0.0), material


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--certs", type=int, default=1000)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/pairlb-bench-certs"))
    args = ap.parse_args()
    t0 = time.monotonic()
    pki = Pki(args.cache)
    leaves = [pki.leaf(f"c{i}", [f"h{i}.test", f"*.h{i}.test"]) for i in range(args.certs)]
    print(f"{args.certs} certificates ready in {time.monotonic() - t0:.1f} s ({args.cache})")
    work = args.cache / "live"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    files = []
    for i, leaf in enumerate(leaves):
        c, k = work / f"c{i}.pem", work / f"c{i}.key"
        shutil.copy(leaf.cert, c)
        shutil.copy(leaf.key, k)
        k.chmod(0o600)
        files.append((c, k))
    cfg = config(files)
    keeper = TlsKeeper()
    took, lag, material = asyncio.run(timed_load(keeper, cfg))
    n = args.certs
    print(f"control: read and check {n} certificates {took * 1000:.0f} ms "
          f"({took / n * 1e6:.0f} us each), event loop at most {lag * 1000:.1f} ms late")
    print(f"worker channel: {wire_size(material) / 2**20:.2f} MiB of TLS material")  # type: ignore[arg-type]
    assert cfg.listener[0].tls is not None
    lt = ListenerTls("https", cfg.listener[0].tls, Stats())
    bundles = material.listeners["https"].bundles  # type: ignore[attr-defined]
    t = time.monotonic()
    lt.load(bundles)
    build = time.monotonic() - t
    print(f"worker: build {n} contexts {build * 1000:.0f} ms ({build / n * 1e6:.0f} us each)")
    renewed = pki.leaf("renewed", ["h0.test", "*.h0.test"])
    shutil.copy(renewed.cert, files[0][0])
    shutil.copy(renewed.key, files[0][1])
    took2, lag2, material2 = asyncio.run(timed_load(keeper, cfg))
    t = time.monotonic()
    lt.load(material2.listeners["https"].bundles)  # type: ignore[attr-defined]
    rebuild = time.monotonic() - t
    print(f"reload, one renewed: control {took2 * 1000:.0f} ms (loop at most "
          f"{lag2 * 1000:.1f} ms late), worker {rebuild * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
