"""virtio-net: ``device.py`` (the virtio network protocol, §5.1), ``tap.py`` (the host's TAP
device as its frame backend, made and removed with the VM), ``persist.py`` (its state record).
"""

from virtkit.devices.virtio.net.device import FrameBackend, NetDevice, format_mac, parse_mac

__all__ = ["FrameBackend", "NetDevice", "format_mac", "parse_mac"]
