"""Confining one VMM process before guest code runs.

A VMM handles guest-controlled data on every exit, so it is the first thing a hostile guest
attacks. After start-up a virtkit VMM needs only what it has already opened (``/dev/kvm``'s VM
and vCPU fds, guest memory, disk images, its serial log and control socket) and a small set of
system calls. :func:`virtkit.jail.confine.confine` takes everything else away, layer by layer:
namespaces, an empty read-only root, rlimits, an unprivileged uid with no capabilities,
``no_new_privs`` and a seccomp allow-list (:mod:`virtkit.jail.policy`). ``docs/SECURITY.md``
says what each layer stops.

May import: ``virtkit.host`` (libc calls, capabilities, the seccomp compiler) and ``virtkit.errors``;
never ``virtkit.container``.
"""
