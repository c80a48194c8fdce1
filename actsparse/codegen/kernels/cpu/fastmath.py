"""float32 exp and sigmoid as plain TIR arithmetic, so that loops over them vectorize.

LLVM's exp intrinsic has no vector instruction on x86 or ARM: a vectorized loop calls libm's
expf once per lane. Cephes' expf (2^n times a degree-7 polynomial, the ln 2 reduction in two
parts) is a dozen vector instructions with ~1e-7 relative error. TVM's ``topi.fast_exp`` is the
same polynomial with a one-part reduction, ~1e-5 relative error at |x| ~ 88.
"""

from __future__ import annotations

from tvm.script import tirx as T

_EXP_POLYNOMIAL = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                   5.0000001201e-1)


def exp_f32(x):
    """exp(x) for a float32 TIR expression; 0 below -87.3 (no denormals), finite up to 88.4."""
    x = T.max(T.min(x, T.float32(88.3762626647949)), T.float32(-87.3365447504019))
    n = T.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    r = x - n * T.float32(0.693359375) + n * T.float32(2.12194440e-4)
    p = T.float32(_EXP_POLYNOMIAL[0])
    for c in _EXP_POLYNOMIAL[1:]:
        p = p * r + T.float32(c)
    p = p * r * r + r + T.float32(1)
    return p * T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))


def sigmoid_f32(x):
    """1 / (1 + exp(-x)) for a float32 TIR expression (0 below x = -87.3, 1 above 17)."""
    return T.float32(1) / (T.float32(1) + exp_f32(-x))
