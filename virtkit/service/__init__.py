"""virtkitd: the hypervisor as a service.

One long-running daemon (:mod:`virtkit.service.daemon`) keeps VM definitions and events in SQLite
(:mod:`virtkit.service.store`), accounts for host CPU and memory (:mod:`virtkit.service.resources`),
gives each VM a cgroup (:mod:`virtkit.service.cgroups`) and a confined VMM process of its own
(:mod:`virtkit.service.vmm`, jailed by :mod:`virtkit.jail`), and serves a REST API on a Unix socket
(:mod:`virtkit.service.api`, described by :mod:`virtkit.service.openapi`). What crosses any of
those edges is a typed record of :mod:`virtkit.service.model`. The process is
:mod:`virtkit.service.server` (``virtkitd``, ``python -m virtkit.service``), above both the API
and the service. The CLI talks to it through :mod:`virtkit.service.client`.

May import: ``virtkit.jail``, ``virtkit.host`` (cgroup layout and files, libc calls), ``virtkit.api``
and everything below; never the CLI.
"""
