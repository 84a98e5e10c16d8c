"""Paravirtualized devices (virtio 1.2). ``spec.py``: numbers from the specification; ``queue.py``:
the split virtqueue, device side (§2.7)."""
