"""Which manifest of an image index a node pulls: its platform, as containerd's matcher
ranks what it runs."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

from contract import ErrorKind, PullFailed


@dataclass(frozen=True)
class Platform:
    """An OCI platform (``os``, ``architecture``, ``variant``), as image indexes name them."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        """As ``ctr --platform`` takes it: ``linux/arm/v7``."""
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    def normalized(self) -> Platform:
        """containerd's spelling: ``arm64`` without ``v8``, ``arm`` with ``v7`` when none is
        named, ``amd64`` without ``v1``."""
        architecture = _ARCHITECTURES.get(self.architecture, self.architecture)
        variant = (
            self.variant
            if self.variant.startswith("v") or not self.variant
            else (f"v{self.variant}")
        )
        if architecture == "arm64" and variant == "v8":
            variant = ""
        elif architecture == "arm" and not variant:
            variant = "v7"
        elif architecture == "amd64" and variant == "v1":
            variant = ""
        return Platform(self.os, architecture, variant)

    def runs(self) -> list[Platform]:
        """What this platform runs, best first, as containerd's platform matcher ranks it:
        itself, then older ARM variants (an arm64 node also runs 32-bit ARM), then 386 on
        amd64."""
        own = self.normalized()
        found = [own]
        if own.architecture == "amd64":
            found.append(Platform(own.os, "386"))
        elif own.architecture in ("arm", "arm64"):
            newest = 8 if own.architecture == "arm64" else int(own.variant[1:] or 7)
            first = newest if own.architecture == "arm64" else newest - 1
            found += [Platform(own.os, "arm", f"v{version}") for version in range(first, 4, -1)]
        return found


_ARCHITECTURES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}


def node_platform(machine: str = "") -> Platform:
    """This machine's platform (``machine`` as ``uname -m`` says it): the variant for ARM
    from the processor's generation. 32-bit ARM on an ARMv8 processor (``armv8l``) is
    ``arm/v7``: images are published for it; hardly any for ``arm/v8``."""
    machine = (machine or platform.machine()).lower()
    arm = re.fullmatch(r"armv(\d+)\w*", machine)
    if arm:
        return Platform("linux", "arm", f"v{min(int(arm.group(1)), 7)}")
    if re.fullmatch(r"i[3-6]86", machine):
        return Platform("linux", "386")
    if machine in ("aarch64", "arm64"):
        return Platform("linux", "arm64", "v8")
    return Platform("linux", _ARCHITECTURES.get(machine, machine))


def platform_manifest(index: object, node: Platform | None = None) -> str:
    """The digest of the manifest an image index has for the node's platform: its own, the
    variant included, else the best other one the node runs (as the kubelet chooses)."""
    node = node or node_platform()
    listed: list[tuple[Platform, str]] = []
    manifests = index.get("manifests", []) if isinstance(index, dict) else []
    for entry in manifests if isinstance(manifests, list) else []:
        named = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(named, dict):
            offered = Platform(
                str(named.get("os", "")),
                str(named.get("architecture", "")),
                str(named.get("variant", "")),
            )
            listed.append((offered.normalized(), str(entry.get("digest"))))
    for wanted in node.runs():
        for offered, digest in listed:
            if offered == wanted:
                return digest
    raise PullFailed(
        ErrorKind.ENGINE_ERROR, f"the image index names no manifest for {node} (nor one it runs)"
    )
