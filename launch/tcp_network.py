"""Print the network (CIDR, e.g. 10.1.0.0/16) of the interface that holds the address this host's name
resolves to: the network the cluster knows the node by. Nothing when the name resolves to loopback
or to no local interface (one machine, a laptop). env.sh gives it to Open MPI's TCP transports, so
ranks on different nodes never try an address that every node holds (Docker's 172.17.0.1, a VM
bridge), which reaches the rank's own node instead and hangs the job."""
from __future__ import annotations

import ipaddress
import socket

import psutil


def node_network() -> str:
    try:
        address = ipaddress.ip_address(socket.gethostbyname(socket.gethostname()))
    except (OSError, ValueError):
        return ""
    if address.is_loopback:
        return ""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and a.address == str(address) and a.netmask:
                return str(ipaddress.ip_interface(f"{a.address}/{a.netmask}").network)
    return ""


if __name__ == "__main__":
    print(node_network())
