"""Hand-written kernels per target (``cpu/``) and their numpy references (``reference``).

Import ``actsparse.codegen.kernels.cpu`` for the kernels (it imports TVM).
"""
