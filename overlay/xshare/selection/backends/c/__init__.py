"""The C backend for CPU serving (``Decision.backend == 'c'``): the policy's decision for one layer call
in one C call, bitwise the torch reference's.

kernel  the library (``_cpu_select.c`` and ``_cpu_router.c``, compiled at first use and loaded with
        ctypes) and plain layers (``cpu_route``, ``decide_cpu``).
router  router-spec layers: biased and grouped gates (``decide_router_c``).
"""
