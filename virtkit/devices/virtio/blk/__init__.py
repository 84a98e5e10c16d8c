"""virtio-blk: ``device.py`` (the virtio request protocol, §5.2) and ``image.py`` (the raw image file)."""

from virtkit.devices.disk import RawImage
from virtkit.devices.virtio.blk.device import BlockDevice

__all__ = ["BlockDevice", "RawImage"]
