"""The coefficient row that every sampler step is reduced to (docs/math.md, "One math").

Per element, with u/c the unconditional/conditional model outputs, g the guidance scale, L the image's saved
sample slot and H0..H2 its history slots (the multistep solvers' earlier x0 or eps predictions):
    m   = u + g*(c - u)                          (classifier-free guidance; m = model output without it)
    x0  = ax*x + am*m                            (predicted x_0 from epsilon / v / sample prediction)
    x0  = clip(x0, -clip, clip)                  (where clip > 0)
    eps = bx*x + bm*m + b0*x0                    (the epsilon DDIM uses)
    d   = q0*x0 + qe*eps                         (this step's history value: x0 for DPM-Solver++/UniPC, eps for PLMS)
    s   = sx*x + sl*L + sd*d + sh0*H0 + sh1*H1 + sh2*H2          (a stage sample: UniPC's corrected x, PLMS's x_t)
    x'  = p0*x0 + px*x + pe*eps + ps*s + pd*d + ph0*H0 + ph1*H1 + ph2*H2 + sigma*z   (z ~ N(0, 1) from Philox)
then L <- s where write_s = 1, and H[write_d] <- d where write_d >= 0. A row whose multistep columns (q0 ..
write_s) are all 0 and write_d = -1 is a single-step row (DDPM, DDIM, Euler): the kernels skip the slots.
"""

COLUMNS = (
    "ax", "am", "bx", "bm", "b0", "p0", "px", "pe", "sigma", "clip",
    "q0", "qe", "sx", "sl", "sd", "sh0", "sh1", "sh2", "ps", "pd", "ph0", "ph1", "ph2", "write_d", "write_s",
)  # fmt: skip
NUM_COLUMNS = len(COLUMNS)
MEANINGS = {  # one line per column, for `ddengine info` (the program above)
    "ax": "x0 = ax*x + am*m: weight of x",
    "am": "x0: weight of the (guided) model output m",
    "bx": "eps = bx*x + bm*m + b0*x0: weight of x",
    "bm": "eps: weight of m",
    "b0": "eps: weight of x0",
    "p0": "x' = p0*x0 + px*x + pe*eps + ...: weight of x0",
    "px": "x': weight of x",
    "pe": "x': weight of eps",
    "sigma": "x': weight of the Philox noise z",
    "clip": "x0 clipped to [-clip, clip] (0: not clipped)",
    "q0": "history value d = q0*x0 + qe*eps: weight of x0",
    "qe": "d: weight of eps",
    "sx": "stage sample s = sx*x + sl*L + sd*d + sh*H: weight of x",
    "sl": "s: weight of the saved sample L",
    "sd": "s: weight of d",
    "sh0": "s: weight of history slot H0",
    "sh1": "s: weight of H1",
    "sh2": "s: weight of H2",
    "ps": "x': weight of s",
    "pd": "x': weight of d",
    "ph0": "x': weight of H0",
    "ph1": "x': weight of H1",
    "ph2": "x': weight of H2",
    "write_d": "the slot d is written to (-1: none)",
    "write_s": "1: s is saved into L",
}
(AX, AM, BX, BM, B0, P0, PX, PE, SIGMA, CLIP,
 Q0, QE, SX, SL, SD, SH0, SH1, SH2, PS, PD, PH0, PH1, PH2, WRITE_D, WRITE_S) = range(NUM_COLUMNS)  # fmt: skip
HISTORY_SLOTS = 3  # H0..H2: DPM-Solver++(3M) and PLMS combine up to three earlier predictions with the current one
SLOTS = 1 + HISTORY_SLOTS  # per image: L, H0, H1, H2 (kernels/step.h DD_SLOTS)
MULTISTEP = slice(Q0, WRITE_S + 1)
NO_WRITE = -1.0  # write_d of a row that keeps its history


def blank_row():
    """A row of zeros that writes no history slot (float64 list)."""
    row = [0.0] * NUM_COLUMNS
    row[WRITE_D] = NO_WRITE
    return row


def is_multistep(row):
    """Whether a row reads or writes the image's slots."""
    return row[WRITE_D] != NO_WRITE or row[WRITE_S] != 0 or any(row[k] != 0 for k in range(Q0, WRITE_D))
