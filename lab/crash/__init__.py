"""The crash engine: record a guest's disk writes, enumerate the crash states a power cut can leave, check each.

``logwrites`` reads a recording, ``model`` is the power-loss model, ``enumerate`` lists crash states,
``materialize`` builds them in the guest, ``check`` judges them, ``explore`` ties the steps together, ``replay``
re-checks a reproducer; see docs/CRASH.md.
"""
