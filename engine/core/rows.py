"""The coefficient row that every sampler step is reduced to (docs/math.md, "One math").

Per element, with u/c the unconditional/conditional model outputs and g the guidance scale:
    m   = u + g*(c - u)                     (classifier-free guidance; m = model output without it)
    x0  = ax*x + am*m                       (predicted x_0 from epsilon / v / sample prediction)
    x0  = clip(x0, -r, r)                   (optional)
    eps = bx*x + bm*m + b0*x0               (the epsilon DDIM uses)
    x'  = p0*x0 + px*x + pe*eps + sigma*z   (z ~ N(0, 1) from Philox, counter = (element, step))
"""

COLUMNS = ("ax", "am", "bx", "bm", "b0", "p0", "px", "pe", "sigma")
NUM_COLUMNS = len(COLUMNS)
AX, AM, BX, BM, B0, P0, PX, PE, SIGMA = range(NUM_COLUMNS)
