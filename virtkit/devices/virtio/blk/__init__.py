"""virtio-blk: ``device.py`` (the virtio request protocol, §5.2) and ``image.py`` (the raw image file)."""

from virtkit.devices.virtio.blk.device import BlockDevice
from virtkit.devices.disk import RawImage

__all__ = ["BlockDevice", "RawImage"]
