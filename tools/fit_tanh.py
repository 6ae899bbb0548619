"""Derives the coefficients of the CPU float32 tanh's polynomial branch (csrc/cpu/pointwise.cpp,
tanh_float).

Below |x| = 0.8 the kernel computes tanh(x) = x + x³ · R(x²), R a polynomial of degree 5; above, it
computes 1 − 2/(e^{2|x|} + 1), which from 0.55 on loses nothing to cancellation (2/(e^{2x} + 1) is
then below tanh x). R's coefficients minimise the largest relative error of tanh over 600 Chebyshev
nodes in x on [0, 0.8]: a linear least-squares problem, reweighted towards the minimax solution
(Lawson's algorithm), in 40-digit arithmetic (mpmath, which comes with torch through sympy).
Run: python tools/fit_tanh.py (about 15 seconds). It prints the coefficients and the fit's
largest relative error (3.8e-9, 0.06 of a float32 ulp): the kernel's float rounding, not the fit,
makes its error (tools/tanh_error.py measures it).
"""
import mpmath as mp

mp.mp.dps = 40


def fit(degree=5, x_max=0.8, nodes=600, iterations=40):
    xs = [mp.mpf(x_max) * (1 - mp.cos(mp.pi * (i + mp.mpf(1) / 2) / nodes)) / 2
          for i in range(nodes)]
    weights = [mp.mpf(1)] * nodes
    best = None
    for _ in range(iterations):
        rows, rhs = [], []
        for x, w in zip(xs, weights):
            t = mp.tanh(x)
            scale = w / t  # relative error
            rows.append([scale * x**3 * (x * x)**k for k in range(degree + 1)])
            rhs.append(scale * (t - x))
        sol, _ = mp.qr_solve(mp.matrix(rows), mp.matrix(rhs))
        r = [sol[k] for k in range(degree + 1)]
        errors = [abs((x + x**3 * mp.polyval(r[::-1], x * x)) / mp.tanh(x) - 1) for x in xs]
        worst = max(errors)
        if best is None or worst < best[0]:
            best = (worst, r)
        total = sum(w * e for w, e in zip(weights, errors))
        weights = [max(w * e / total * nodes, mp.mpf(10)**-30) for w, e in zip(weights, errors)]
    return best


if __name__ == "__main__":
    worst, r = fit()
    print("largest relative error of the fit:", mp.nstr(worst, 3))
    print("R (constant term first):", [mp.nstr(v, 12) for v in r])
