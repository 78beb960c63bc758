"""The functions registered with SGLang's ``HookRegistry`` (the table is :mod:`xshare.sglang.plugin`):
each reads SGLang's arguments and hands them down, to the routing decision (:mod:`.routing`), the
forward state (:mod:`.forward`), the model lifecycle (:mod:`.model`) or the request flags
(:mod:`.requests`). Nothing imports this package back."""
