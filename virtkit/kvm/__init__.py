"""KVM bindings: ctypes structures, ioctl numbers, the kvm_run exit layouts and thin typed
wrappers. No policy lives here.

Layouts follow the kernel's ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``;
``tests/unit/kvm`` pins every size and ioctl number against values compiled from those headers.

Owns: every ioctl virtkit makes on /dev/kvm, a VM or a vCPU. May import: ``virtkit.errors`` only.
"""
