"""The host kernel's interface, shared by the container runtime, the jail and the service.

What it owns (each module thin, typed, and without policy: it does what it is asked and says
what the kernel answered):

    libc             the one ctypes handle on the C library; errno-checked wrappers of the
                     system calls Python 3.11's ``os`` lacks (prctl, capget/capset, seccomp,
                     close_range, pidfd_send_signal, bpf, ptrace), and the prototyped libc
                     functions the VMM's hot paths call (ioctl, mmap, munmap, memcmp)
    ns               namespaces: clone flags, unshare, setns, the UTS names
    mounts           mount, umount2, pivot_root, the fd-based mount API, openat2, statfs types
    caps             capability names and numbers, bounding-set drop, setting the sets
    syscalls_x86_64  the x86-64 system call table (name -> number)
    seccomp          OCI ``linux.seccomp`` profiles compiled to classic BPF, and a BPF
                     interpreter to check a program without installing it
    cgroups          the cgroup layout (v1, hybrid, v2), control files, directories per
                     hierarchy, cgroup.kill and freezing, and the limit writes (cpu weight and
                     quota, cpuset, memory, pids) in whichever file the layout has

Who uses it: ``virtkit.kvm`` and ``virtkit.memory`` (the libc handle, imported once at module
level: no indirection on the vCPU path), the snapshot and migration code (memcmp), and
``virtkit.container``, ``virtkit.jail`` and ``virtkit.service``, which keep their own policy above it.

May import: ``virtkit.errors``, ``virtkit.records``, ``virtkit.units`` and the standard library;
nothing else of virtkit. Nothing is imported here: ``import virtkit.host`` costs nothing, callers
import the module they need.
"""
