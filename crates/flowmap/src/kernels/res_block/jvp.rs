//! The residual block's exact forward-mode pass: its value and its tangent in one node per image.

use super::*;

/// The block's value and its tangent along `(ẋ, ṡs)` in one pass per image, as exact forward-mode
/// differentiation of [`res_block`]'s layers: what the U-Net's tangent pass computes layer by layer (a
/// GroupNorm JVP node, two convolutions per layer, the skip, two adds), with the same operations in the
/// same order, so the same bits, but each image's intermediates in scratch memory instead of `B`-image
/// tensors, and one parallel region instead of a dozen. `dx` has the parts of `x`, `dss` the shape of
/// `ss`. Nothing is recorded for a backward pass. `None` where the fused pass does not apply (another
/// device or dtype, or shapes [`res_block`] would take [`plain`] for): the caller runs the layers.
#[allow(clippy::too_many_arguments)]
pub fn res_block_jvp(
    x: &[&Tensor],
    dx: &[&Tensor],
    ss: &Tensor,
    dss: &Tensor,
    p: &ResBlockParams<'_>,
    groups: usize,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    if x.is_empty() || x.len() > 2 || dx.len() != x.len() || dss.dims() != ss.dims() {
        return Err(crate::Error::arg(
            "residual block JVP: the input and its tangent come in the same one or two parts, ss and ṡs alike",
        ));
    }
    let (b, c_a, h, w) = x[0].dims4()?;
    let mut c = 0;
    for (part, tangent) in x.iter().zip(dx) {
        let (b2, ci, h2, w2) = part.dims4()?;
        if (b2, h2, w2) != (b, h, w) || tangent.dims() != part.dims() {
            return Err(crate::Error::arg(format!(
                "residual block JVP: parts {:?} and tangents {:?} do not fit",
                x.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>(),
                dx.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>()
            )));
        }
        c += ci;
    }
    let (o, k) = (p.conv1.0.dim(0)?, p.conv1.0.dim(2)?);
    if !(applies(x[0].device(), x[0].dtype()) && p.fit(c, groups) && ss.dims() == [b, 2 * o]) {
        return Ok(None);
    }
    let mut tensors = vec![ss, dss, p.norm1, p.conv1.0, p.conv1.1, p.norm2, p.conv2.0, p.conv2.1];
    if let Some((ws, bs)) = p.skip {
        tensors.extend([ws, bs]);
    }
    tensors.extend(x.iter().chain(dx));
    let owned: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.detach().contiguous())
        .collect::<candle_core::Result<_>>()?;
    let reads: Option<Vec<_>> = owned.iter().map(crate::kernels::read).collect();
    let Some(reads) = reads else {
        return Ok(None);
    };
    let sl: Vec<&[f32]> = reads.iter().map(|r| r.slice()).collect();
    let (ss, dss, norm1, w1, b1, norm2, w2, b2) = (sl[0], sl[1], sl[2], sl[3], sl[4], sl[5], sl[6], sl[7]);
    let (skip, rest) = if p.skip.is_some() {
        (Some((sl[8], sl[9])), &sl[10..])
    } else {
        (None, &sl[8..])
    };
    let (xs, dxs) = rest.split_at(x.len());
    let hw = h * w;
    let sh = Shapes::new(b, c_a, c, o, (h, w), k, groups);
    let (gamma1, beta1) = norm1.split_at(c);
    let (gamma2, beta2) = norm2.split_at(o);
    let zeros = vec![0.0f32; c];
    let n_out = b * o * hw;
    let (mut y, mut dy): (Vec<f32>, Vec<f32>) = (Vec::with_capacity(n_out), Vec::with_capacity(n_out));
    let per = IMAGES_PER_BLOCK * o * hw;
    let blocks: Vec<_> = y.spare_capacity_mut()[..n_out]
        .chunks_mut(per)
        .zip(dy.spare_capacity_mut()[..n_out].chunks_mut(per))
        .enumerate()
        .collect();
    let alone = b == 1;
    map_blocks(blocks, |(i, (yb, dyb))| {
        // Every element of these is written before it is read.
        let two = if x.len() == 2 { c * hw } else { 0 };
        let (mut xcat, mut dxcat) = (Scratch::new(two), Scratch::new(two));
        let (mut n1, mut dn1) = (Scratch::new(c * hw), Scratch::new(c * hw));
        let (mut c1, mut dc1, mut n2, mut dn2) = (
            Scratch::new(o * hw),
            Scratch::new(o * hw),
            Scratch::new(o * hw),
            Scratch::new(o * hw),
        );
        let sk = if skip.is_some() { o * hw } else { 0 };
        let (mut s1, mut ds1) = (Scratch::new(sk), Scratch::new(sk));
        let (mut cols1, mut cols2) = (sh.g1.cols_scratch(), sh.g2.cols_scratch());
        for (j, (yi, dyi)) in yb.chunks_mut(o * hw).zip(dyb.chunks_mut(o * hw)).enumerate() {
            let img = i * IMAGES_PER_BLOCK + j;
            let xi = sh.image(img, xs[0], xs.get(1).copied(), &mut xcat);
            let dxi = sh.image(img, dxs[0], dxs.get(1).copied(), &mut dxcat);
            let z = &zeros[..];
            // SAFETY (each `as_uninit` below): the views are written with initialised values only.
            let (v1, dv1) = unsafe {
                (
                    crate::kernels::dense::as_uninit(&mut n1),
                    crate::kernels::dense::as_uninit(&mut dn1),
                )
            };
            norm::jvp_image(xi, dxi, sh.d1, eps, [gamma1, beta1, z, z, z, z], true, v1, dv1);
            // A convolution into `dst`, as `Conv2d`'s JVP computes it: the value from its bias, the tangent
            // (no bias) from zero.
            let conv = |g: Geometry,
                        wt: &[f32],
                        bias: Option<&[f32]>,
                        src: &[f32],
                        cols: &mut [f32],
                        dst: &mut [MaybeUninit<f32>]| {
                let dst = match bias {
                    Some(bias) => conv::fill_bias(dst, bias, hw),
                    None => zeroed(dst),
                };
                conv::forward_image_alone(g, wt, src, cols, dst, alone);
            };
            conv(sh.g1, w1, Some(b1), &n1, &mut cols1, unsafe {
                crate::kernels::dense::as_uninit(&mut c1)
            });
            conv(sh.g1, w1, None, &dn1, &mut cols1, unsafe {
                crate::kernels::dense::as_uninit(&mut dc1)
            });
            let (a, shift) = ss[img * 2 * o..(img + 1) * 2 * o].split_at(o);
            let (da, dshift) = dss[img * 2 * o..(img + 1) * 2 * o].split_at(o);
            let (v2, dv2) = unsafe {
                (
                    crate::kernels::dense::as_uninit(&mut n2),
                    crate::kernels::dense::as_uninit(&mut dn2),
                )
            };
            norm::jvp_image(
                &c1,
                &dc1,
                sh.d2,
                eps,
                [gamma2, beta2, a, shift, da, dshift],
                true,
                v2,
                dv2,
            );
            conv(sh.g2, w2, Some(b2), &n2, &mut cols2, &mut *yi);
            conv(sh.g2, w2, None, &dn2, &mut cols2, &mut *dyi);
            // SAFETY: both were just written whole.
            let (yi, dyi) = unsafe {
                (
                    crate::kernels::dense::assume_init(yi),
                    crate::kernels::dense::assume_init(dyi),
                )
            };
            // y = skip(x) + h, ẏ = skip(ẋ) + ḣ, the skip's value from its bias and its tangent from zero.
            let (sv, sdv): (&[f32], &[f32]) = match skip {
                Some((ws, bs)) => {
                    conv(sh.gs, ws, Some(bs), xi, &mut [], unsafe {
                        crate::kernels::dense::as_uninit(&mut s1)
                    });
                    conv(sh.gs, ws, None, dxi, &mut [], unsafe {
                        crate::kernels::dense::as_uninit(&mut ds1)
                    });
                    (&s1, &ds1)
                }
                None => (xi, dxi),
            };
            // (`h + skip` is `skip + h` to the bit: IEEE addition commutes.)
            for (d, &v) in yi.iter_mut().zip(sv) {
                *d += v;
            }
            for (d, &v) in dyi.iter_mut().zip(sdv) {
                *d += v;
            }
        }
    });
    // SAFETY: the blocks cover all `n_out` elements of both, and every image wrote all of its own.
    unsafe {
        y.set_len(n_out);
        dy.set_len(n_out);
    }
    let dev = x[0].device();
    Ok(Some((
        Tensor::from_vec(y, (b, o, h, w), dev)?,
        Tensor::from_vec(dy, (b, o, h, w), dev)?,
    )))
}
