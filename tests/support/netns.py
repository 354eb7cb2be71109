"""A bad network between clinic and HQ, made of real kernel parts.

A network namespace is joined to this one by a veth pair with addresses from a /30 that exists
only between the two ends. The clinic's end carries a `tbf` rate limit and can be taken down and
up for outages. HQ's receiver keeps listening on loopback (as behind nginx); `expose` makes it
reachable only across the link: the clinic connects to the far end of the veth, a forwarder
there sends the stream back over the veth to a forwarder on this end, which hands it to the
receiver. Every upload byte crosses the shaped, breakable link; nothing leaves the two ends.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import uuid
from pathlib import Path

from tests.support.site import free_port

REPO = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def unused_third_octet(second: int) -> int:
    """A third octet for a 10.SECOND.x.0/30 link that no interface on this machine has: the
    suite's two workers build links and containers at the same time, and two ends on one subnet
    would route into each other's test."""
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], check=True, capture_output=True,
                           text=True).stdout
    taken = {int(octet) for octet in re.findall(rf"inet 10\.{second}\.(\d+)\.", shown)}
    return random.choice([octet for octet in range(256) if octet not in taken])


class Link:
    def __init__(self, subnet: int = 211) -> None:
        tag = uuid.uuid4().hex[:6]
        self.namespace = f"gotg-hq-{tag}"
        self.clinic_dev, self.hq_dev = f"gc{tag}", f"gh{tag}"
        third = unused_third_octet(subnet)  # a different /30 per link: parallel runs never meet
        self.clinic_ip, self.hq_ip = f"10.{subnet}.{third}.1", f"10.{subnet}.{third}.2"
        self.forwarders: list[subprocess.Popen] = []
        _run("ip", "netns", "add", self.namespace)
        _run("ip", "netns", "exec", self.namespace, "ip", "link", "set", "lo", "up")
        _run("ip", "link", "add", self.clinic_dev, "type", "veth", "peer", "name", self.hq_dev)
        _run("ip", "link", "set", self.hq_dev, "netns", self.namespace)
        _run("ip", "addr", "add", f"{self.clinic_ip}/30", "dev", self.clinic_dev)
        _run("ip", "link", "set", self.clinic_dev, "up")
        _run("ip", "netns", "exec", self.namespace, "ip", "addr", "add", f"{self.hq_ip}/30",
             "dev", self.hq_dev)
        _run("ip", "netns", "exec", self.namespace, "ip", "link", "set", self.hq_dev, "up")

    @property
    def prefix(self) -> list[str]:
        """Run a command inside HQ's namespace."""
        return ["ip", "netns", "exec", self.namespace]

    def shape(self, rate: str) -> None:
        """Limit the clinic's upload, e.g. '1mbit' or '256kbit'."""
        _run("tc", "qdisc", "replace", "dev", self.clinic_dev, "root", "tbf", "rate", rate,
             "burst", "16kb", "latency", "500ms")

    def down(self) -> None:
        _run("ip", "link", "set", self.clinic_dev, "down")

    def up(self) -> None:
        _run("ip", "link", "set", self.clinic_dev, "up")

    def _forwarder(self, prefix: list[str], listen: str, port: int, target: str,
                   target_port: int) -> None:
        self.forwarders.append(subprocess.Popen(
            [*prefix, sys.executable, "-m", "tests.support.netns", listen, str(port), target,
             str(target_port)],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def expose(self, port: int) -> str:
        """Make a loopback port reachable only across the link; the URL the clinic uses.

        The hop back over the veth uses a port of its own: a server listening on every
        interface (Orthanc does) must only ever see the stream arrive from loopback.
        """
        hop = free_port()
        self._forwarder([], self.clinic_ip, hop, "127.0.0.1", port)
        self._forwarder(self.prefix, self.hq_ip, port, self.clinic_ip, hop)
        return f"http://{self.hq_ip}:{port}"

    def close(self) -> None:
        for forwarder in self.forwarders:
            forwarder.kill()
            forwarder.wait()
        subprocess.run(["ip", "link", "del", self.clinic_dev], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _forward(listen_ip: str, port: int, target_ip: str, target_port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(target_ip, target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, listen_ip, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":  # a forwarder: LISTEN_IP PORT TARGET_IP TARGET_PORT
    asyncio.run(_forward(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
