"""The civex live and catch-up workloads, run against NATS JetStream.

Two nats-server processes (started by run.sh): a hub with JetStream domain
"hub" and a leaf node with domain "leaf", linked by a leafnode connection.
A file-backed stream on the hub, a file-backed mirror of it on the leaf.

live:     the mirror exists and is connected; publish N messages of SIZE bytes
          to the hub with INFLIGHT publish acks outstanding; time from the
          first publish until the mirror on the leaf holds all N.
catch-up: no mirror; publish M messages to the hub (acked), then create
          the mirror and time until it holds all M.

The servers keep JetStream's default sync behaviour: a publish is acked
once written to the stream's file, before any fsync (sync_interval, 2 min
by default), and nothing is signed or verified.

Prints one line per workload and writes the figures as JSON (--json).
"""

import argparse
import asyncio
import json
import sys
import time

import nats
from nats.js import api
from nats.js.errors import NotFoundError


def fail(message):
    print(f"bench.py: {message}", file=sys.stderr)
    sys.exit(1)


async def until(what, check, limit):
    """Retries `check` (an async callable returning a truthy value) until it
    holds or `limit` seconds pass."""
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        try:
            result = await check()
            if result:
                return result
        except Exception as err:  # noqa: BLE001: retried, reported at the end
            last = err
        await asyncio.sleep(0.05)
    fail(f"timed out after {limit} s waiting for {what}" + (f": {last!r}" if last else ""))


async def drop_stream(js, name):
    try:
        await js.delete_stream(name)
    except NotFoundError:
        pass


async def publish_all(nc, subject, count, size, inflight):
    """Publishes `count` messages to a JetStream subject with at most
    `inflight` acks outstanding. Returns (seconds until every ack, errors)."""
    payload = bytes(size)
    inbox = nc.new_inbox()
    window = asyncio.Semaphore(inflight)
    acked = 0
    errors = []
    all_acked = asyncio.get_running_loop().create_future()

    async def on_ack(msg):
        nonlocal acked
        acked += 1
        # A stored message is acked {"stream":..,"seq":..}; anything else
        # (an error object, or an empty 503 "no responders") is a failure.
        if not msg.data.startswith(b'{"stream"'):
            errors.append(msg.data[:200])
        window.release()
        if acked == count and not all_acked.done():
            all_acked.set_result(time.perf_counter())

    sub = await nc.subscribe(inbox, cb=on_ack, pending_msgs_limit=4 * inflight + 1024)
    await nc.flush()
    started = time.perf_counter()
    for _ in range(count):
        await window.acquire()
        await nc.publish(subject, payload, reply=inbox)
    await nc.flush()
    finished = await asyncio.wait_for(all_acked, timeout=600)
    await sub.unsubscribe()
    return started, finished, errors


async def held(js, stream):
    info = await js.stream_info(stream)
    return info.state.messages


async def wait_held(js, stream, count, limit, poll=0.005):
    """Polls the stream until it holds `count` messages; returns the time."""
    deadline = time.monotonic() + limit
    while True:
        messages = await held(js, stream)
        if messages >= count:
            return time.perf_counter()
        if time.monotonic() > deadline:
            fail(f"{stream} holds {messages} of {count} after {limit} s")
        await asyncio.sleep(poll)


def mirror_config(name, origin, hub_domain):
    return api.StreamConfig(
        name=name,
        storage=api.StorageType.FILE,
        mirror=api.StreamSource(
            name=origin,
            external=api.ExternalStream(api=f"$JS.{hub_domain}.API"),
        ),
    )


async def wait_mirror_active(js, name):
    async def active():
        info = await js.stream_info(name)
        mirror = info.mirror
        return mirror is not None and mirror.active is not None and mirror.active >= 0 and not mirror.error

    await until(f"mirror {name} to connect to its origin", active, 30)


async def live(hub, leaf, args):
    js1, js2 = hub.jetstream(), leaf.jetstream()
    for js, name in ((js2, "LIVE_MIRROR"), (js1, "LIVE")):
        await drop_stream(js, name)
    await js1.add_stream(api.StreamConfig(name="LIVE", subjects=["live.>"], storage=api.StorageType.FILE))
    await js2.add_stream(mirror_config("LIVE_MIRROR", "LIVE", args.hub_domain))
    await wait_mirror_active(js2, "LIVE_MIRROR")

    cpu = time.process_time()
    mirrored = asyncio.create_task(wait_held(js2, "LIVE_MIRROR", args.live, 600))
    started, acked, errors = await publish_all(hub, "live.bench", args.live, args.size, args.inflight)
    held_at = await mirrored
    cpu = time.process_time() - cpu
    if errors:
        fail(f"{len(errors)} publishes were refused, e.g. {errors[0]!r}")
    on_hub = await held(js1, "LIVE")
    if on_hub != args.live:
        fail(f"the stream holds {on_hub} messages, expected {args.live}")
    seconds = held_at - started
    result = {
        "messages": args.live,
        "size": args.size,
        "inflight": args.inflight,
        "seconds": seconds,
        "rate": args.live / seconds,
        "acked_seconds": acked - started,
        "acked_rate": args.live / (acked - started),
        "client_cpu_seconds": cpu,
    }
    print(
        f"NATS live: {args.live} messages of {args.size} bytes published to the hub with "
        f"{args.inflight} acks in flight, all held by the mirror on the leaf {seconds:.1f} s after "
        f"the first publish: {result['rate']:.0f}/s end to end (all acked at "
        f"{result['acked_seconds']:.1f} s: {result['acked_rate']:.0f}/s; client CPU "
        f"{cpu:.1f} s)",
        flush=True,
    )
    for js, name in ((js2, "LIVE_MIRROR"), (js1, "LIVE")):
        await drop_stream(js, name)
    return result


async def catch_up(hub, leaf, args):
    js1, js2 = hub.jetstream(), leaf.jetstream()
    for js, name in ((js2, "CATCHUP_MIRROR"), (js1, "CATCHUP")):
        await drop_stream(js, name)
    await js1.add_stream(api.StreamConfig(name="CATCHUP", subjects=["catchup.>"], storage=api.StorageType.FILE))
    started, acked, errors = await publish_all(hub, "catchup.bench", args.catch_up, args.size, args.inflight)
    if errors:
        fail(f"{len(errors)} publishes were refused, e.g. {errors[0]!r}")
    on_hub = await held(js1, "CATCHUP")
    if on_hub != args.catch_up:
        fail(f"the stream holds {on_hub} messages, expected {args.catch_up}")
    print(
        f"NATS catch-up: {args.catch_up} messages stored on the hub in {acked - started:.1f} s "
        f"({args.catch_up / (acked - started):.0f}/s); creating the mirror on the leaf",
        flush=True,
    )
    created = time.perf_counter()
    await js2.add_stream(mirror_config("CATCHUP_MIRROR", "CATCHUP", args.hub_domain))
    held_at = await wait_held(js2, "CATCHUP_MIRROR", args.catch_up, 1800, poll=0.02)
    seconds = held_at - created
    result = {
        "messages": args.catch_up,
        "size": args.size,
        "seconds": seconds,
        "rate": args.catch_up / seconds,
        "stored_seconds": acked - started,
    }
    print(
        f"NATS catch-up: a new mirror on the leaf held all {args.catch_up} messages "
        f"{seconds:.1f} s after it was created: {result['rate']:.0f}/s",
        flush=True,
    )
    for js, name in ((js2, "CATCHUP_MIRROR"), (js1, "CATCHUP")):
        await drop_stream(js, name)
    return result


async def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", required=True, help="URL of the hub server")
    parser.add_argument("--leaf", required=True, help="URL of the leaf server")
    parser.add_argument("--hub-domain", default="hub")
    parser.add_argument("--live", type=int, default=100_000)
    parser.add_argument("--catch-up", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--inflight", type=int, default=256)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    async def connect(url):
        return await nats.connect(url, max_reconnect_attempts=0, pending_size=64 * 1024 * 1024)

    hub = await until(f"the hub at {args.hub}", lambda: connect(args.hub), 30)
    leaf = await until(f"the leaf at {args.leaf}", lambda: connect(args.leaf), 30)
    # JetStream is up on both, and the leaf reaches the hub's JetStream.
    await until("JetStream on the hub", lambda: hub.jetstream().account_info(), 30)
    await until("JetStream on the leaf", lambda: leaf.jetstream().account_info(), 30)
    await until(
        "the hub's JetStream through the leafnode link",
        lambda: leaf.jetstream(domain=args.hub_domain).account_info(),
        30,
    )
    results = {}
    if args.live > 0:
        results["live"] = await live(hub, leaf, args)
    if args.catch_up > 0:
        results["catch_up"] = await catch_up(hub, leaf, args)
    await hub.close()
    await leaf.close()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
