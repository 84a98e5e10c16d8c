"""virtio-blk: ``device.py`` (the virtio request protocol, §5.2) over a raw image
(:mod:`virtkit.devices.disk`).
"""

from virtkit.devices.disk import RawImage
from virtkit.devices.virtio.blk.device import BlockDevice

__all__ = ["BlockDevice", "RawImage"]
