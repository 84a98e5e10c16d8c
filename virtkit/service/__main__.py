"""``python -m virtkit.service``: virtkitd (:mod:`virtkit.service.server`)."""

from virtkit.service.server import run

run()
