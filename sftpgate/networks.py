"""Client addresses against configured networks (`sftp.proxy_protocol`, `sftp.ban_allowlist`);
below the configuration, which checks those keys with `parse_network`."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(value: str) -> Network:
    """A CIDR ("10.0.0.0/8", "fd00::/8") or a single address; host bits are allowed, since
    "192.168.1.5/24" can only mean that LAN."""
    return ipaddress.ip_network(value.strip(), strict=False)


class Networks:
    """A set of networks; an address is in it when any network contains it."""

    def __init__(self, values: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(parse_network(v) for v in values)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str) or not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
        except ValueError:
            return False
        # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; the config names them as IPv4.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)
