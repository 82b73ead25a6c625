//! Elementwise f32 kernels, each compiled three times (AVX-512, AVX2 + FMA, baseline) and dispatched on the
//! CPU's features at run time. The bodies are plain loops over slices that LLVM vectorises; `exp` is a
//! branch-free polynomial so that it vectorises too.

use std::mem::MaybeUninit;

/// Defines `fn name(args)` that runs `body` compiled for the best instruction set the CPU offers.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        multiversion! { $(#[$m])* $vis fn $name($($arg: $ty),*) -> () $body }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) -> $ret { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret { body($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq") {
                    // SAFETY: the CPU has the features `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `v3` is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// `e^x` in f32 by Cephes' `expf` (range reduction by `ln 2` in two parts, degree-6 polynomial, ≤ 2 ulp on
/// the clamped range), written without branches so that loops over it vectorise.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // 2ⁿ from the bits: n + 127 ∈ [2, 254] sits in the low mantissa bits of 2²³ + n + 127, and shifting
    // by 23 moves it into the exponent field (a float-to-int cast would not vectorise).
    y * f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23)
}

/// `(sin x, cos x)` in f32 by Cephes' `sinf`/`cosf`: Cody–Waite reduction by `π/2` in three parts to
/// `|r| ≤ π/4`, the two minimax polynomials, then the quadrant's swap and signs, all branch-free (absolute
/// error ≤ 1e-6 for `|x| ≤ 1e4`).
#[inline(always)]
pub(crate) fn sin_cos(x: f32) -> (f32, f32) {
    const TWO_OVER_PI: f32 = std::f32::consts::FRAC_2_PI;
    const P1: f32 = 1.570_312_5;
    const P2: f32 = 4.837_513e-4;
    const P3: f32 = 7.549_79e-8;
    let q = (x * TWO_OVER_PI + 0.5).floor();
    let r = ((x - q * P1) - q * P2) - q * P3;
    let r2 = r * r;
    let s = r + r * r2 * (-1.666_665_5e-1 + r2 * (8.332_161e-3 + r2 * -1.951_529_6e-4));
    let c = 1.0 - 0.5 * r2 + r2 * r2 * (4.166_664_6e-2 + r2 * (-1.388_731_6e-3 + r2 * 2.443_315_7e-5));
    // The quadrant q mod 4 from the low mantissa bits of q + 1.5·2²³ (exact for |q| < 2²²).
    let quadrant = (q + 12_582_912.0).to_bits();
    let (a, b) = if quadrant & 1 == 1 { (c, s) } else { (s, c) };
    let sin = if quadrant & 2 == 2 { -a } else { a };
    let cos = if (quadrant.wrapping_add(1)) & 2 == 2 { -b } else { b };
    (sin, cos)
}

multiversion! {
    /// One row of the posterior mean of the data points given `x` on the linear path: with `x0t` the
    /// points by feature (`d` runs of `n`), `out = Σ_j w_j·x0_j`, `w_j ∝ exp(−‖x − a·x0_j‖² · inv)`
    /// (`a = 1 − t`, `inv = 1/2t²`). `buf` (`n`) is scratch.
    pub(crate) fn posterior_mean_row(x: &[f32], a: f32, inv: f32, x0t: &[f32], buf: &mut [f32], out: &mut [f32]) {
        let n = buf.len();
        buf.iter_mut().for_each(|b| *b = 0.0);
        for (c, col) in x.iter().zip(x0t.chunks_exact(n)) {
            for (b, z) in buf.iter_mut().zip(col) {
                let r = c - a * z;
                *b += r * r;
            }
        }
        let nearest = lanes(buf, f32::INFINITY, |m, &b, _| m.min(b), f32::min);
        for b in buf.iter_mut() {
            *b = exp((nearest - *b) * inv);
        }
        let total = lanes(buf, 0.0, |s, &b, _| s + b, |a, b| a + b);
        for (o, col) in out.iter_mut().zip(x0t.chunks_exact(n)) {
            *o = lanes(buf, 0.0, |s, &b, j| s + b * col[j], |a, b| a + b) / total;
        }
    }
}

/// Folds `v` in 16 interleaved lanes (`step(lane, &v[j], j)`), then the lanes with `join`: independent
/// chains that vectorise, where one running fold would be a chain of dependent additions.
#[inline(always)]
fn lanes(v: &[f32], init: f32, step: impl Fn(f32, &f32, usize) -> f32, join: impl Fn(f32, f32) -> f32) -> f32 {
    const L: usize = 16;
    let mut acc = [init; L];
    let whole = v.len() / L * L;
    for (c, chunk) in v[..whole].chunks_exact(L).enumerate() {
        for (k, (a, x)) in acc.iter_mut().zip(chunk).enumerate() {
            *a = step(*a, x, c * L + k);
        }
    }
    let mut r = acc.into_iter().fold(init, &join);
    for (j, x) in v.iter().enumerate().skip(whole) {
        r = join(r, step(init, x, j));
    }
    r
}

/// `Σ f(v[j])` in f64 over 16 interleaved lanes, the lanes then added in order: [`lanes`] for sums that need
/// f64's range and precision.
#[inline(always)]
fn sum_f64(v: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    const L: usize = 16;
    let mut acc = [0.0f64; L];
    let whole = v.len() / L * L;
    for chunk in v[..whole].chunks_exact(L) {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += f(x as f64);
        }
    }
    acc.into_iter().sum::<f64>() + v[whole..].iter().map(|&x| f(x as f64)).sum::<f64>()
}

multiversion! {
    /// `(mean, variance)` of `v` (the biased variance, about the mean in a second pass), in f64.
    pub(crate) fn mean_var(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = sum_f64(v, |x| x) / n;
        (mean, sum_f64(v, |x| (x - mean) * (x - mean)) / n)
    }
}

multiversion! {
    /// One channel of GroupNorm's forward pass: `dst = act(src·scale + offset)`, SiLU when `silu`.
    pub(crate) fn norm_row(src: &[f32], dst: &mut [MaybeUninit<f32>], scale: f32, offset: f32, silu: bool) {
        if silu {
            for (o, &v) in dst.iter_mut().zip(src) {
                let z = v * scale + offset;
                o.write(z * sigmoid(z));
            }
        } else {
            for (o, &v) in dst.iter_mut().zip(src) {
                o.write(v * scale + offset);
            }
        }
    }
}

/// One channel's constants of GroupNorm's backward pass: `x̂ = (x − mean)·inv`, `n = γ·x̂ + β`,
/// `z = n·(1 + a) + shift`.
#[derive(Clone, Copy)]
pub(crate) struct NormChannel {
    pub mean: f32,
    pub inv: f32,
    pub gamma: f32,
    pub beta: f32,
    pub one_a: f32,
    pub shift: f32,
    pub silu: bool,
}

multiversion! {
    /// One channel of GroupNorm's backward pass, first sweep: from the output gradient `g`, writes
    /// `g_x̂ = g_z·(1 + a)·γ` into `gxhat` and returns `(Σ g_z·n, Σ g_z, Σ g_n·x̂, Σ g_n)` (the gradients of
    /// `a`, `shift`, `γ` and `β`), summed in 16 lanes in a fixed order.
    pub(crate) fn norm_backward_row(x: &[f32], g: &[f32], gxhat: &mut [f32], c: NormChannel) -> [f32; 4] {
        if c.silu {
            norm_backward_lanes::<true>(x, g, gxhat, c)
        } else {
            norm_backward_lanes::<false>(x, g, gxhat, c)
        }
    }
}

#[inline(always)]
fn norm_backward_lanes<const SILU: bool>(x: &[f32], g: &[f32], gxhat: &mut [f32], c: NormChannel) -> [f32; 4] {
    const L: usize = 16;
    #[inline(always)]
    fn one<const SILU: bool>(x: f32, g: f32, c: &NormChannel) -> (f32, f32, f32, f32, f32) {
        let xhat = (x - c.mean) * c.inv;
        let n = c.gamma * xhat + c.beta;
        let z = n * c.one_a + c.shift;
        let gz = if SILU {
            let sg = sigmoid(z);
            g * (sg + z * sg * (1.0 - sg))
        } else {
            g
        };
        let gn = gz * c.one_a;
        (gz * n, gz, gn * xhat, gn, gn * c.gamma)
    }
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; L], [0.0f32; L], [0.0f32; L], [0.0f32; L]);
    let whole = x.len() / L * L;
    for ((xc, gc), oc) in x[..whole]
        .chunks_exact(L)
        .zip(g[..whole].chunks_exact(L))
        .zip(gxhat[..whole].chunks_exact_mut(L))
    {
        for k in 0..L {
            let (p0, p1, p2, p3, o) = one::<SILU>(xc[k], gc[k], &c);
            a0[k] += p0;
            a1[k] += p1;
            a2[k] += p2;
            a3[k] += p3;
            oc[k] = o;
        }
    }
    let mut out = [a0, a1, a2, a3].map(|a| a.iter().sum::<f32>());
    for j in whole..x.len() {
        let (p0, p1, p2, p3, o) = one::<SILU>(x[j], g[j], &c);
        out[0] += p0;
        out[1] += p1;
        out[2] += p2;
        out[3] += p3;
        gxhat[j] = o;
    }
    out
}

multiversion! {
    /// One group of GroupNorm's backward pass, second sweep: `(mean g_x̂, mean g_x̂·x̂)` over the group.
    pub(crate) fn norm_group_moments(x: &[f32], gxhat: &[f32], mean: f32, inv: f32) -> (f32, f32) {
        let m1 = lanes(gxhat, 0.0, |s, &v, _| s + v, |a, b| a + b);
        let m2 = lanes(gxhat, 0.0, |s, &v, j| s + v * ((x[j] - mean) * inv), |a, b| a + b);
        let n = x.len() as f32;
        (m1 / n, m2 / n)
    }
}

/// Per-channel constants of GroupNorm's forward-mode pass (see [`norm_jvp_row`]).
#[derive(Clone, Copy)]
pub(crate) struct NormJvpChannel {
    pub mean: f32,
    pub inv: f32,
    /// The group's `mean ẋ`.
    pub m1: f32,
    /// `z = a·x̂ + b`.
    pub a: f32,
    pub b: f32,
    /// `ż = p·(ẋ − m1) + q·x̂ + r`.
    pub p: f32,
    pub q: f32,
    pub r: f32,
    pub silu: bool,
}

multiversion! {
    /// One channel of GroupNorm's forward-mode pass: with `x̂ = (x − μ)·inv`, `z = a·x̂ + b` and
    /// `ż = p·(ẋ − m1) + q·x̂ + r`; then `y = silu(z)`, `ẏ = ż·s·(1 + z·(1 − s))` with `s = σ(z)`, or `y = z`.
    pub(crate) fn norm_jvp_row(
        x: &[f32],
        dx: &[f32],
        y: &mut [MaybeUninit<f32>],
        dy: &mut [MaybeUninit<f32>],
        c: NormJvpChannel,
    ) {
        let it = y.iter_mut().zip(dy.iter_mut()).zip(x.iter().zip(dx));
        if c.silu {
            for ((o, d), (&v, &dv)) in it {
                let xh = (v - c.mean) * c.inv;
                let z = c.a * xh + c.b;
                let dz = c.p * (dv - c.m1) + c.q * xh + c.r;
                let sg = sigmoid(z);
                o.write(z * sg);
                d.write(dz * (sg * (1.0 + z * (1.0 - sg))));
            }
        } else {
            for ((o, d), (&v, &dv)) in it {
                let xh = (v - c.mean) * c.inv;
                o.write(c.a * xh + c.b);
                d.write(c.p * (dv - c.m1) + c.q * xh + c.r);
            }
        }
    }
}

multiversion! {
    /// One group of GroupNorm's backward pass, last sweep: `dx = inv·(g_x̂ − m1 − x̂·m2)`.
    pub(crate) fn norm_group_dx(x: &[f32], gxhat: &[f32], dx: &mut [f32], mean: f32, inv: f32, m1: f32, m2: f32) {
        for ((d, &v), &gx) in dx.iter_mut().zip(x).zip(gxhat) {
            let xhat = (v - mean) * inv;
            *d = inv * (gx - m1 - xhat * m2);
        }
    }
}

multiversion! {
    /// `acc += x`, element by element.
    pub(crate) fn add_assign(acc: &mut [f32], x: &[f32]) {
        for (a, v) in acc.iter_mut().zip(x) {
            *a += *v;
        }
    }
}

multiversion! {
    /// `sin[k] = sin(ω_k t)`, `cos[k] = cos(ω_k t)`.
    pub(crate) fn sin_cos_scaled(t: f32, freqs: &[f32], sin: &mut [f32], cos: &mut [f32]) {
        for ((w, s), c) in freqs.iter().zip(sin.iter_mut()).zip(cos.iter_mut()) {
            let (a, b) = sin_cos(*w * t);
            *s = a;
            *c = b;
        }
    }
}

/// The logistic sigmoid `1 / (1 + e^{−x})`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

multiversion! {
    /// Per row of `z` (`row` wide): `z += bias`.
    pub(crate) fn add_bias(z: &mut [f32], bias: &[f32]) {
        for zr in z.chunks_exact_mut(bias.len()) {
            for (v, b) in zr.iter_mut().zip(bias) {
                *v += *b;
            }
        }
    }
}

multiversion! {
    /// Per row, with `a = z + bias`: `y = silu(a) = a·σ(a)` (every element written) and `z ← σ(a)`, which is
    /// all the backward pass needs besides `y`.
    pub(crate) fn add_bias_silu(z: &mut [f32], y: &mut [MaybeUninit<f32>], bias: &[f32]) {
        for (zr, yr) in z.chunks_exact_mut(bias.len()).zip(y.chunks_exact_mut(bias.len())) {
            for ((v, o), b) in zr.iter_mut().zip(yr.iter_mut()).zip(bias) {
                let a = *v + *b;
                let s = sigmoid(a);
                *v = s;
                o.write(a * s);
            }
        }
    }
}

multiversion! {
    /// Forward mode through bias and SiLU, in place: with `a = z + bias`, `z ← silu(a)` and
    /// `dz ← dz ⊙ silu'(a)`, `silu'(a) = σ(a) + silu(a)·(1 − σ(a))`.
    pub(crate) fn silu_jvp(z: &mut [f32], dz: &mut [f32], bias: &[f32]) {
        for (zr, dr) in z.chunks_exact_mut(bias.len()).zip(dz.chunks_exact_mut(bias.len())) {
            for ((v, d), b) in zr.iter_mut().zip(dr.iter_mut()).zip(bias) {
                let a = *v + *b;
                let s = sigmoid(a);
                let y = a * s;
                *v = y;
                *d *= s + y * (1.0 - s);
            }
        }
    }
}

/// Lanes of the partial sums in [`skinny_forward`]: one AVX-512 register.
const LANES: usize = 16;

multiversion! {
    /// A layer with few outputs (`W`: `out × in`, `out` small), where a GEMM kernel idles: per row of `x`,
    /// `z[j] = b[j] + x·W[j]` by dot products accumulated in `LANES` independent partial sums.
    pub(crate) fn skinny_forward(x: &[f32], w: &[f32], bias: &[f32], z: &mut [f32]) {
        let n_out = bias.len();
        let n_in = w.len() / n_out;
        for (xr, zr) in x.chunks_exact(n_in).zip(z.chunks_exact_mut(n_out)) {
            for ((zj, wj), bj) in zr.iter_mut().zip(w.chunks_exact(n_in)).zip(bias) {
                let mut acc = [0.0f32; LANES];
                let (xa, xt) = xr.split_at(n_in - n_in % LANES);
                let (wa, wt) = wj.split_at(n_in - n_in % LANES);
                for (xc, wc) in xa.chunks_exact(LANES).zip(wa.chunks_exact(LANES)) {
                    for l in 0..LANES {
                        acc[l] += xc[l] * wc[l];
                    }
                }
                let tail: f32 = xt.iter().zip(wt).map(|(a, b)| a * b).sum();
                *zj = *bj + acc.iter().sum::<f32>() + tail;
            }
        }
    }
}

multiversion! {
    /// The backward pass of [`skinny_forward`] over a block of rows (`n_in` wide): `dx = dz·W` when asked
    /// (every element written), and `dw += dzᵀ·x` (`dw` is the block's partial sum).
    pub(crate) fn skinny_backward(
        dz: &[f32],
        w: &[f32],
        x: &[f32],
        n_in: usize,
        dx: Option<&mut [MaybeUninit<f32>]>,
        dw: &mut [f32],
    ) {
        let n_out = w.len() / n_in;
        let rows = dz.chunks_exact(n_out).zip(x.chunks_exact(n_in));
        match dx {
            Some(dx) => {
                for ((dzr, xr), dxr) in rows.zip(dx.chunks_exact_mut(n_in)) {
                    // dx = Σ_j dz_j·W_j: the first term initialises the row, the others accumulate.
                    let (g0, rest) = dzr.split_first().expect("a layer has outputs");
                    for (d, wv) in dxr.iter_mut().zip(&w[..n_in]) {
                        d.write(g0 * wv);
                    }
                    // SAFETY: every element of the row was written just above.
                    let dxr = unsafe { &mut *(dxr as *mut [MaybeUninit<f32>] as *mut [f32]) };
                    for (g, wj) in rest.iter().zip(w[n_in..].chunks_exact(n_in)) {
                        for (d, wv) in dxr.iter_mut().zip(wj) {
                            *d += g * wv;
                        }
                    }
                    for (g, dwj) in dzr.iter().zip(dw.chunks_exact_mut(n_in)) {
                        for (a, xv) in dwj.iter_mut().zip(xr) {
                            *a += g * xv;
                        }
                    }
                }
            }
            None => {
                for (dzr, xr) in rows {
                    for (g, dwj) in dzr.iter().zip(dw.chunks_exact_mut(n_in)) {
                        for (a, xv) in dwj.iter_mut().zip(xr) {
                            *a += g * xv;
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// In place over `s = σ(a)`: `s ← g ⊙ silu'(a)` with `silu'(a) = σ(a) + y·(1 − σ(a))`, `y = silu(a)` (no
    /// exponential needed), and `colsum += Σ_rows` of the result.
    pub(crate) fn silu_backward(s: &mut [f32], y: &[f32], g: &[f32], colsum: &mut [f32]) {
        let w = colsum.len();
        for ((sr, yr), gr) in s.chunks_exact_mut(w).zip(y.chunks_exact(w)).zip(g.chunks_exact(w)) {
            for (((sv, yv), gv), c) in sr.iter_mut().zip(yr).zip(gr).zip(colsum.iter_mut()) {
                let d = *gv * (*sv + *yv * (1.0 - *sv));
                *sv = d;
                *c += d;
            }
        }
    }
}

multiversion! {
    /// `colsum += Σ_rows g`.
    pub(crate) fn column_sum(g: &[f32], colsum: &mut [f32]) {
        let w = colsum.len();
        for gr in g.chunks_exact(w) {
            for (c, v) in colsum.iter_mut().zip(gr) {
                *c += *v;
            }
        }
    }
}

/// One AdamW step's scalars (candle-nn's `AdamW` algebra, so both paths agree).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamScalars {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 − lr·λ`.
    pub decay: f32,
    /// `1 / (1 − β1^t)` and `1 / (1 − β2^t)`.
    pub scale_m: f32,
    pub scale_v: f32,
}

multiversion! {
    /// `m ← β1 m + (1 − β1) g`, `v ← β2 v + (1 − β2) g²`,
    /// `θ ← (1 − lr λ) θ − lr · m̂ / (√v̂ + eps)` with `m̂ = m/(1 − β1^t)`, `v̂ = v/(1 − β2^t)`.
    pub(crate) fn adamw_update(theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], a: AdamScalars) {
        for (((p, mi), vi), gi) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let nm = *mi * a.beta1 + *gi * (1.0 - a.beta1);
            let nv = *vi * a.beta2 + *gi * *gi * (1.0 - a.beta2);
            *mi = nm;
            *vi = nv;
            let step = (nm * a.scale_m) / ((nv * a.scale_v).sqrt() + a.eps);
            *p = *p * a.decay - step * a.lr;
        }
    }
}

multiversion! {
    /// `ema ← d·ema + (1 − d)·live`.
    pub(crate) fn ema_update(ema: &mut [f32], live: &[f32], d: f32) {
        for (e, l) in ema.iter_mut().zip(live) {
            *e = *e * d + *l * (1.0 - d);
        }
    }
}

/// `a` (`rows × cols`, row-major) transposed into `cols × rows`: 8×8 tiles through AVX registers where the
/// CPU has AVX, the ragged edges (and every element elsewhere) one by one. A pure permutation: bit-exact.
pub(crate) fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(
        a.len(),
        rows * cols,
        "transpose: {} elements for {rows}×{cols}",
        a.len()
    );
    let mut t: Vec<f32> = Vec::with_capacity(a.len());
    let out = &mut t.spare_capacity_mut()[..a.len()];
    let (tiled_rows, tiled_cols) = {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx") {
                // SAFETY: the CPU has AVX; `transpose_tiles_avx` stays inside both buffers' `rows × cols`.
                unsafe { transpose_tiles_avx(a, rows, cols, out) };
                (rows / 8 * 8, cols / 8 * 8)
            } else {
                (0, 0)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            (0, 0)
        }
    };
    // The ragged edges: the columns right of the tiles in the tiled rows, then every column of the rest.
    for r in 0..rows {
        let from = if r < tiled_rows { tiled_cols } else { 0 };
        for c in from..cols {
            out[c * rows + r].write(a[r * cols + c]);
        }
    }
    // SAFETY: the tiles and the loop above wrote every element once.
    unsafe { t.set_len(a.len()) };
    t
}

/// The whole 8×8 tiles of [`transpose`]: eight row loads, the standard unpack/shuffle/permute network,
/// eight row stores.
///
/// # Safety
/// The CPU must have AVX; `a` and `out` must hold `rows × cols` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_tiles_avx(a: &[f32], rows: usize, cols: usize, out: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    let (src, dst) = (a.as_ptr(), out.as_mut_ptr().cast::<f32>());
    for r0 in (0..rows / 8 * 8).step_by(8) {
        for c0 in (0..cols / 8 * 8).step_by(8) {
            let s = src.add(r0 * cols + c0);
            let r: [__m256; 8] = std::array::from_fn(|k| _mm256_loadu_ps(s.add(k * cols)));
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u = [
                _mm256_shuffle_ps::<0x44>(t0, t2),
                _mm256_shuffle_ps::<0xEE>(t0, t2),
                _mm256_shuffle_ps::<0x44>(t1, t3),
                _mm256_shuffle_ps::<0xEE>(t1, t3),
                _mm256_shuffle_ps::<0x44>(t4, t6),
                _mm256_shuffle_ps::<0xEE>(t4, t6),
                _mm256_shuffle_ps::<0x44>(t5, t7),
                _mm256_shuffle_ps::<0xEE>(t5, t7),
            ];
            let d = dst.add(c0 * rows + r0);
            for k in 0..4 {
                _mm256_storeu_ps(d.add(k * rows), _mm256_permute2f128_ps::<0x20>(u[k], u[k + 4]));
                _mm256_storeu_ps(d.add((k + 4) * rows), _mm256_permute2f128_ps::<0x31>(u[k], u[k + 4]));
            }
        }
    }
}

#[cfg(test)]
mod tests;
